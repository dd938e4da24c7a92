"""Floor 2: metrics — FID (`fid`), image metrics (`image`: mask IoU, SSIM), 3D shape and camera metrics
(`shape`), keypoint transfer and PCK (`keypoints`). Pure functions over arrays; each states its protocol."""

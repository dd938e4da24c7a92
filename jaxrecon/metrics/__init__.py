"""Floor 2: metrics (FID now; mask IoU, SSIM and keypoint transfer with the evaluation issue)."""

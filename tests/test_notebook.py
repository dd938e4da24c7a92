"""notebooks/quickstart.ipynb runs headless end to end (tiny sizes via JAXRECON_NOTEBOOK_TINY=1)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

_NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, checkpointed_workdir, monkeypatch):
  data_dir = checkpointed_workdir[1]        # the tiny dataset, already generated
  workdir = str(tmp_path / "quickstart")
  monkeypatch.setenv("JAXRECON_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("JAXRECON_NOTEBOOK_WORKDIR", workdir)
  monkeypatch.setenv("JAXRECON_DATA_DIR", data_dir)
  monkeypatch.delenv("XLA_FLAGS", raising=False)          # one CPU device in the kernel, not the tests' 8
  nb = nbformat.read(os.path.join(_NOTEBOOKS, "quickstart.ipynb"), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": _NOTEBOOKS}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  assert "jaxrecon from" in text and "last training loss" in text
  markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
  assert "| mask_iou |" in markdown
  images = [o for o in outputs if "image/png" in o.get("data", {}) or "image/gif" in o.get("data", {})]
  assert len(images) >= 3                                  # the sheet, the GIF and the plot
  for name in ("eval_test/metrics.json", "predictions/photo/mesh.glb", "predictions/photo/sheet.png",
               "variance_toy.png"):
    assert os.path.exists(os.path.join(workdir, name)), name

"""Accelerator backends shipped with ucm. `ucm.backends.cuda` and `ucm.backends.npu` are installed from the
top-level `backends/` folder (see setup.py); the CPU reference lives in `ucm.device.cpu`."""

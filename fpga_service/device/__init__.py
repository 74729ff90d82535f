"""The HBM device layer (issue 6): the `HbmDevice` contract, the software U55C
(`emulator`) and the pyxrt implementation (`xrt`), which share the kernel ABI of
docs/fpga-kernel-abi.md (`abi`)."""

"""Metrics, the end of the data flow: generated and real volumes -> MMD, MS-SSIM, RAS, FD."""

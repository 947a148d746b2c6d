"""Metrics for generated volumes: MMD, MS-SSIM, registration and the Realistic Atlas Score."""

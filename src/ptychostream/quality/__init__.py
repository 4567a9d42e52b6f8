"""Scoring reconstructions: registration, SSIM/PSNR/FRC, baselines."""

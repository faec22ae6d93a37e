"""fastopt: fused multi-tensor AdamW and Lion as torch.optim drop-ins."""

"""Files to tensors and back: reading images and masks, dataset layouts, few-shot expansion, and the input
geometry (resize, padding, crop, tiles) with its way back onto the original image."""

"""Long-tailed data: the LT profile, dataset sources, augmentation and test-time preprocessing."""

"""What runs the models: the store (families, plans, loading), the model cache, devices, dynamic
batching, CPU split workers, request limits and model-config checks."""

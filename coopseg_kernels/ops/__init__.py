"""One module per fused op: custom-op registration, autograd, dispatch."""

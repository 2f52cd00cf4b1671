"""Custom ops: validation, ``torch.library`` registration (fake + autograd) and backend dispatch."""

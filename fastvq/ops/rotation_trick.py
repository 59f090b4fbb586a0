"""PLACEHOLDER: being written; replaced before commit."""
def rotation_trick(*args, **kwargs):
    raise NotImplementedError('rotation_trick')

"""PLACEHOLDER: being written; replaced before commit."""
def code_usage(*args, **kwargs):
    raise NotImplementedError('code_usage')
def CodeUsage(*args, **kwargs):
    raise NotImplementedError('CodeUsage')
def CodeUsageMeter(*args, **kwargs):
    raise NotImplementedError('CodeUsageMeter')

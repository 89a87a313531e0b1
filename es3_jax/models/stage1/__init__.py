"""EfficientSAM3's stage-1 student trunks: RepViT, TinyViT and EfficientViT backbones with the head
that maps them onto SAM3's ViT features (`stage1_trunk.Stage1Trunk`).

Each family module mirrors the upstream PyTorch module names in its parameter paths, so that
`porting.stage1_checkpoint` maps checkpoint keys by leaf name alone.
"""

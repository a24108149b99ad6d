"""timm backbones, registered with timm on `import vision3d`."""

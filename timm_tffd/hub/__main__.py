"""``python -m timm_tffd.hub push OUTPUT_DIR --repo-id ORG/NAME``."""
from .cli import main

main()

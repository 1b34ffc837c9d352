"""``python -m timm_tffd.hub push OUTPUT_DIR --repo-id ORG/NAME``."""
from . import main

main()

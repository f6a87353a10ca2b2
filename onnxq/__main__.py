from onnxq.cli import main
import sys
sys.exit(main())

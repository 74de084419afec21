from crosstrain.cli import main

raise SystemExit(main())

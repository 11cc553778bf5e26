from wanfit.cli import main

raise SystemExit(main())

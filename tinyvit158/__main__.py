from tinyvit158.cli import main

raise SystemExit(main())

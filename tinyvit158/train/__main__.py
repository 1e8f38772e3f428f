from tinyvit158.train.trainer import main

raise SystemExit(main())

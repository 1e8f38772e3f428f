from tinyvit158.predict import main

raise SystemExit(main())

from specforge_vocab.cli.main import main

raise SystemExit(main())

from ditlab.cli import main

raise SystemExit(main())

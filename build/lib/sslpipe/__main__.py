from sslpipe.cli import main

raise SystemExit(main())

from fedjax_dp.cli import main

raise SystemExit(main())

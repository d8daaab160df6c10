from fedjax_dp.runner.cli import main

raise SystemExit(main())

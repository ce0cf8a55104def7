from fleet.simulator.server import main

raise SystemExit(main())

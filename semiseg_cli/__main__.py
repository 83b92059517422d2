from semiseg_cli.cli import main

main()

from mistral_cli.cli.app import main

main()

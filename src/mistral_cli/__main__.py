from mistral_cli.cli import main

main()

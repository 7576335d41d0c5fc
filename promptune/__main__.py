from promptune.cli import main

main()

from replica.cli import main

main()

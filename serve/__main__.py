from serve._cli import main

main()

from serve._proxy.cli import main

main()

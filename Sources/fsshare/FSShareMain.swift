#if canImport(Glibc)
import Glibc
#endif
import FSShareCommands

@main
struct FSShareMain {
    static func main() async {
        let status = await FSShareCLI.runMain(Array(CommandLine.arguments.dropFirst()))
        exit(status)
    }
}

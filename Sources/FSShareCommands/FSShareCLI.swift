#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import FSShare
import FSShareAgentChannel
import FSShareSystem
import SystemPackage

/// The `fsshare` command.
public struct FSShareCLI: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "fsshare",
        abstract: "Share host filesystems into VM sandboxes (Kata-compatible layout and descriptors).",
        discussion: "Exit status: 0 ok, 1 the operation failed, 2 usage error. Under --json an error is one JSON object on standard error: {\"error\": {\"code\", \"message\"}}.",
        version: FSShareCLI.version,
        subcommands: [Prepare.self, Cleanup.self, Share.self, Unshare.self, ShareRootfs.self, UnshareRootfs.self, InspectImage.self, Status.self, Watch.self])

    /// What `fsshare --version` prints.
    public static let version = "fsshare 0.4 (manifest format 1; Kata agent protocol subset: Storage, CopyFile, Health)"

    public init() {}

    /// Parses `arguments`, runs the command, and returns the process exit status.
    public static func runMain(_ arguments: [String]) async -> Int32 {
        let json = arguments.contains("--json")
        /// One error line: text, or one JSON object under --json.
        func report(_ kind: String, _ message: String) {
            let line = json
                ? JSON.object([("error", .object([("code", .string(kind)), ("message", .string(message))]))]).compact()
                : "fsshare: \(message)"
            writeAll(fd: 2, Array((line + "\n").utf8))
        }
        var command: any ParsableCommand
        do {
            command = try parseAsRoot(arguments)
        } catch {
            // The command line itself: usage errors exit 2; --help and --version exit 0.
            let code = exitCode(for: error)
            let message = fullMessage(for: error)
            if code == .success {
                print(message)
                return 0
            }
            writeAll(fd: 2, Array((message + "\n").utf8))
            return 2
        }
        do {
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
            return 0
        } catch let error as FSShareError {
            report(error.code.rawValue, error.message)
            return 1
        } catch let error as AgentError {
            report("agent-" + error.code.rawValue, error.message)
            return 1
        } catch let error as ValidationError {
            // A combination of options that parsing could not see: still a usage error.
            report("usage", error.message)
            return 2
        } catch {
            // --help and --version arrive here as a clean exit.
            if exitCode(for: error) == .success {
                print(fullMessage(for: error))
                return 0
            }
            // Anything else went wrong while operating: an operational failure.
            report("failed", fullMessage(for: error))
            return 1
        }
    }
}

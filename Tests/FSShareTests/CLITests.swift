import FSShare
import FSShareCommands
import FSShareProto
import SwiftProtobuf
import FSShareSystem
import SystemPackage
import Testing

@Suite("fsshare CLI")
struct CLITests {
    @Test("usage errors exit 2, help exits 0")
    func exitCodes() async {
        #expect(await FSShareCLI.runMain(["share", "--bogus"]) == 2)
        #expect(await FSShareCLI.runMain(["prepare"]) == 2)  // --sandbox missing
        #expect(await FSShareCLI.runMain(["cleanup"]) == 2)  // neither --sandbox nor --all
        #expect(await FSShareCLI.runMain(["prepare", "--sandbox", "x", "--root", "relative"]) == 2)
        #expect(await FSShareCLI.runMain(["share-rootfs", "--sandbox", "s", "--container", "c"]) == 2)
        #expect(await FSShareCLI.runMain(["--help"]) == 0)
        #expect(await FSShareCLI.runMain(["share", "--help"]) == 0)
    }

    @Test("--version, and errors under --json are one JSON object")
    func versionAndJSONErrors() {
        let bin = TestEnvironment.product("fsshare")
        let version = Sys.run([bin, "--version"])
        #expect(version.status == 0 && version.output.hasPrefix("fsshare "), "\(version.output)")
        let root = TestEnvironment.scratch("cli-json-error")
        // An operational failure (not a usage error): exit 1, one JSON line with code and message.
        let failed = Sys.run([bin, "share", "--root", root, "--sandbox", "s", "--container", "c", "--source", "/tmp", "--destination", "/d", "--json"])
        #expect(failed.status == 1, "\(failed.output)")
        let line = failed.output.split(separator: "\n").last.map(String.init) ?? ""
        #expect(line.hasPrefix("{\"error\":{\"code\":\"notPrepared\",\"message\":") && line.hasSuffix("}}"), "\(line)")
        let watch = Sys.run([bin, "watch", "--root", root + "/missing", "--json"])
        #expect(watch.status == 1 && watch.output.contains("{\"error\":"), "\(watch.output)")
    }

    @Test("operation failures exit 1")
    func operationFailure() async {
        // Not prepared: fails without touching anything.
        let root = TestEnvironment.scratch("cli-unprepared")
        #expect(await FSShareCLI.runMain(["share", "--root", root, "--sandbox", "s", "--container", "c", "--source", "/tmp", "--destination", "/d"]) == 1)
        #expect(await FSShareCLI.runMain(["share", "--root", root, "--sandbox", "../x", "--container", "c", "--source", "/tmp", "--destination", "/d"]) == 1)
    }

    @Test("every command end to end, in a private mount namespace", .enabled(if: TestEnvironment.canMount, "needs CAP_SYS_ADMIN"))
    func endToEnd() {
        let dir = TestEnvironment.scratch("cli")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        let bin = TestEnvironment.product("fsshare")
        let script = """
            set -e
            B=\(bin); R=\(dir)/root; S=\(dir)/src
            mkdir -p $S/vol $S/rootfs && echo v > $S/vol/k
            $B prepare --root $R --sandbox pod --shm-size 1024 --json > \(dir)/prepare.json
            $B prepare --root $R --sandbox pod --format binary > \(dir)/prepare.bin
            $B share --root $R --sandbox pod --container web --source $S/vol --destination /v --ro --json > \(dir)/share.json
            $B share-rootfs --root $R --sandbox pod --container web --dir $S/rootfs
            $B share-rootfs --root $R --sandbox pod --container db --block-device 0:0:0:1 --fstype xfs --block-driver virtio-scsi --json > \(dir)/blk.json
            $B status --root $R --json > \(dir)/status.json
            $B unshare --root $R --sandbox pod --container web --destination /v
            $B unshare-rootfs --root $R --sandbox pod --container web
            $B unshare-rootfs --root $R --sandbox pod --container db
            $B cleanup --root $R --all --json > \(dir)/cleanup.json
            test -z "$(ls -A $R)"
            ! grep -q " $R" /proc/self/mountinfo
            echo done
            """
        let r = Sys.run(["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script])
        #expect(r.status == 0, "\(r.output)")
        let prepare = read(dir + "/prepare.json")
        #expect(prepare.contains("\"driver\":\"virtio-fs\"") && prepare.contains("\"mount_point\":\"/run/kata-containers/shared/containers/\""))
        #expect(prepare.contains("\"driver\":\"ephemeral\"") && prepare.contains("size=1024"))
        let binary = readBytes(dir + "/prepare.bin")
        // One length-delimited message: a one-byte varint length, then a Storage.
        #expect(binary.first.map { Int($0) + 1 } == binary.count, "binary output is one varint-delimited message")
        let decoded = try? Storage(serializedBytes: Array(binary.dropFirst()))
        #expect(decoded?.driver == "virtio-fs" && decoded?.source == "kataShared")
        #expect(read(dir + "/share.json").contains("/run/kata-containers/shared/containers/web-"))
        let blk = read(dir + "/blk.json")
        #expect(blk.contains("\"driver\":\"scsi\"") && blk.contains("\"options\":[\"nouuid\"]"))
        let status = read(dir + "/status.json")
        #expect(status.contains("\"id\": \"pod\"") && status.contains("\"read_only\": true") && status.contains("\"leaked_mounts\": []"))
        #expect(read(dir + "/cleanup.json").contains("\"pod\""))
    }

    func read(_ path: String) -> String { String(decoding: readBytes(path), as: UTF8.self) }
    func readBytes(_ path: String) -> [UInt8] {
        guard let fd = try? Sys.openat(nil, .init(path), flags: 0) else { return [] }
        defer { Sys.close(fd) }
        return (try? Sys.readAll(fd, path: .init(path))) ?? []
    }
}

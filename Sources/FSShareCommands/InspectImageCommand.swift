import ArgumentParser
import FSShare
import SystemPackage

/// The JSON form of a recognised image, shared by `inspect-image` and `share-rootfs --image`.
enum ImageFields {
    static func json(_ image: RootfsImage) -> JSON {
        .object([
            ("format", .string(image.format.rawValue)), ("fstype", .string(image.filesystemType)),
            ("offset", .number(Int(image.offset))), ("size", .number(Int(image.size))),
            ("sif_partition", image.sifPartitionID.map { .number(Int($0)) } ?? .null),
        ])
    }
}

struct InspectImage: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect-image",
        abstract: "Recognise a rootfs image from its bytes and print the byte range to attach.",
        discussion: """
            Squashfs 4, ext2/3/4 and erofs images, and SIF files (the root filesystem partition: the \
            primary system partition, or the only system one) are recognised from their content, never \
            their name; anything else, encrypted images included, is refused with what was found. Attach \
            the printed byte range to the VM as a read-only raw disk (for SIF only the partition), then \
            run share-rootfs --image FILE --device-address ADDR.

            Example:
              fsshare inspect-image /var/lib/images/app.sif --json
            """)
    @OptionGroup var common: CommonOptions
    @Argument(help: "The image file.") var image: String

    func run() async throws {
        let found = try RootfsImage.inspect(FilePath(image))
        if common.json {
            print(JSON.object([("image", .string(image))] + { if case .object(let f) = ImageFields.json(found) { return f } else { return [] } }()).render())
        } else {
            print("\(image): \(found.summary); attach bytes \(found.offset)..<\(found.offset + found.size) read-only, mounted as \(found.filesystemType)")
        }
    }
}

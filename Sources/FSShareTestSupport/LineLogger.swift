import Logging

/// A swift-log handler that hands each record's message to a closure: what tests and the
/// benchmark use to read a watcher's log.
public struct LineLogHandler: LogHandler {
    let sink: @Sendable (String) -> Void
    public var logLevel: Logger.Level = .trace
    public var metadata: Logger.Metadata = [:]

    public init(_ sink: @escaping @Sendable (String) -> Void) { self.sink = sink }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) { sink(event.message.description) }
}

extension Logger {
    /// A logger whose messages go to `sink`, one call per record.
    public static func lines(_ sink: @escaping @Sendable (String) -> Void) -> Logger {
        Logger(label: "fsshare.test", factory: { _ in LineLogHandler(sink) })
    }
}

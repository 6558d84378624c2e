import Tracing

/// Trace spans through swift-distributed-tracing, tagged as Kata tags its filesystem-sharing
/// spans (`fsShareTracingTags` in Kata's Go runtime: `source: runtime`, `subsystem: fs_share`),
/// with `package: fsshare` for this package. The library never bootstraps a tracer: with none
/// bootstrapped (the no-op tracer) a span costs a start and an end call and no attribute is built.
package enum Spans {
    package static let tags: [(String, String)] = [("source", "runtime"), ("package", "fsshare"), ("subsystem", "fs_share")]

    /// Starts a span under `context`, tagged, with `attributes` (built only if the span records).
    package static func start(_ name: String, context: ServiceContext, attributes: @autoclosure () -> [(String, String)]) -> any Span {
        let span = InstrumentationSystem.tracer.startAnySpan(name, context: context, ofKind: .internal)
        if span.isRecording {
            var all = SpanAttributes()
            for (k, v) in tags { all[k] = v }
            for (k, v) in attributes() { all[k] = v }
            span.attributes = all
        }
        return span
    }

    /// Marks `span` failed with `error`'s code and sentence.
    package static func fail(_ span: any Span, _ error: FSShareError) {
        guard span.isRecording else { return }
        span.recordError(error)
        span.attributes["fsshare.error.code"] = error.code.rawValue
        span.setStatus(SpanStatus(code: .error, message: error.message))
    }

    /// Runs `body` in a span named `name` under `context`; a thrown error marks the span failed.
    package static func run<T>(
        _ name: String, context: ServiceContext, attributes: @autoclosure () -> [(String, String)], _ body: () throws(FSShareError) -> T
    ) throws(FSShareError) -> T {
        let span = start(name, context: context, attributes: attributes())
        defer { span.end() }
        do {
            return try body()
        } catch {
            fail(span, error)
            throw error
        }
    }
}

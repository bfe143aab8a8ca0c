// Compiled by `tsc --noEmit` (npm test): uses the whole API as an application would, and checks
// that the declarations refuse what the client refuses.
import Default, {
  CLOSED,
  Crier,
  CrierError,
  OPEN,
  Subscription,
  type CrierCloseEvent,
  type CrierGapEvent,
  type ErrorCode,
  type Message,
  type Position,
  type PublishResult,
  type ServerStats,
  type Welcome,
} from "../crier.js";

interface Reading {
  load: number;
}

export async function example(): Promise<void> {
  const crier = new Crier("ws://127.0.0.1:8080/ws", {
    encoding: "msgpack",
    token: "a.jwt.token",
    getToken: async () => "fresh.jwt.token",
    reconnect: { minDelay: 250, maxDelay: 10_000 },
    highWaterMark: 256 * 1024,
    pingInterval: 5_000,
    batch: true,
  });
  const other = new Default(new URL("wss://example.invalid/ws"), { reconnect: false, getToken: () => "t" });
  void other;

  const sub: Subscription = crier.subscribe<Reading>(
    "metrics.cpu",
    (message: Message<Reading>) => {
      const topic: string = message.topic;
      const seq: number = message.seq;
      const load: number = message.data.load;
      void [topic, seq, load];
    },
    { rewind: 10, mode: "latest", maxRate: 5 },
  );
  const subscribed: Subscription = await sub.ready;
  const position: Position | null = subscribed.position;
  if (position) {
    const epoch: string = position.epoch;
    void epoch;
    crier.subscribe("metrics.cpu", () => {}, { since: position });
  }
  const active: boolean = sub.active;
  const topic: string = sub.topic;
  void [active, topic];
  const pattern = crier.subscribe("metrics.>", (m) => {
    const data: unknown = m.data;
    void data;
  });
  await pattern.unsubscribe();

  try {
    const result: PublishResult = await crier.publish("metrics.cpu", { load: 0.5 });
    const seq: number = result.seq;
    void seq;
  } catch (error) {
    if (error instanceof CrierError) {
      const code: ErrorCode = error.code;
      if (code === "buffer_full" || code === "forbidden" || code === "rate_limited") {
        const status: number | undefined = error.status;
        void status;
      }
    }
  }

  const stats: ServerStats = await crier.refreshServerStats();
  const behind: boolean = stats.serverBufferedAmount > 0 || crier.serverBufferedAmount > 0;
  const dropped: number = stats.dropped + crier.dropped;
  const buffered: number = crier.bufferedAmount;
  void [behind, dropped, buffered];

  if (crier.readyState === OPEN || crier.readyState === Crier.CONNECTING || crier.readyState === crier.CLOSING) {
    const welcome: Welcome | null = crier.welcome;
    const limit: number | undefined = welcome?.limits.max_message_bytes;
    void limit;
  }

  crier.addEventListener("open", (event) => {
    const again: boolean = event.reconnected;
    const connection: string = event.welcome.connection;
    void [again, connection];
  });
  crier.addEventListener("close", (event: CrierCloseEvent) => {
    const code: number = event.code;
    const reason: string = event.reason;
    const again: boolean = event.willReconnect;
    void [code, reason, again, event.wasClean];
  });
  const off = crier.on("reconnecting", (event) => {
    const attempt: number = event.attempt;
    const delay: number = event.delay;
    void [attempt, delay];
  });
  off();
  const onGap = (event: CrierGapEvent) => {
    const reason: "epoch" | "history" | "dropped" | "reconnected" = event.reason;
    void [event.topic, reason, event.missed, event.epoch];
  };
  crier.on("gap", onGap);
  crier.off("gap", onGap);
  crier.on("error", (event) => {
    if (event.error instanceof CrierError) void event.error.code;
    void event.message;
  });
  crier.addEventListener("something-else", (event: Event) => void event.type);

  await crier.close();
  const closed: boolean = crier.readyState === CLOSED;
  void closed;
}

export function refused(crier: Crier): void {
  // @ts-expect-error: only "json" and "msgpack"
  new Crier("ws://h/ws", { encoding: "xml" });
  // @ts-expect-error: getToken gives a string
  new Crier("ws://h/ws", { getToken: () => 42 });
  // @ts-expect-error: mode is "all" or "latest"
  crier.subscribe("t", () => {}, { mode: "fast" });
  // @ts-expect-error: a handler is required
  crier.subscribe("t");
  // @ts-expect-error: readyState is read-only
  crier.readyState = 1;
  // @ts-expect-error: the gap event has no attempt
  crier.on("gap", (event) => event.attempt);
  // @ts-expect-error: subscriptions are made by subscribe()
  new Subscription();
}

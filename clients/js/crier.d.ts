// Type declarations for crier-client (crier.js).

/** How frames are encoded on the connection: subprotocol `crier.json` or `crier.msgpack`. */
export type Encoding = "json" | "msgpack";

/** The WebSocket ready states, as on `WebSocket`. */
export type ReadyState = 0 | 1 | 2 | 3;
export declare const CONNECTING: 0;
export declare const OPEN: 1;
export declare const CLOSING: 2;
export declare const CLOSED: 3;

/** Where a topic subscription stands: its stream's epoch and the last seq handed to the handler. */
export interface Position {
  epoch: string;
  seq: number;
}

/** A message handed to a subscription's handler. */
export interface Message<T = unknown> {
  topic: string;
  /** Counts the topic's publishes from 1, within its stream's epoch. */
  seq: number;
  data: T;
}

/** The pieces of `@msgpack/msgpack` the client uses, for `options.msgpack`. */
export interface MsgpackCodec {
  encode(value: unknown): Uint8Array;
  decodeMulti(bytes: Uint8Array | ArrayLike<number> | ArrayBufferView | ArrayBuffer): Generator<unknown, void, unknown>;
}

/** A constructor with the WebSocket interface: the global one, or the `ws` package's. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[], ...rest: any[]) => {
  readonly readyState: number;
  readonly bufferedAmount: number;
  binaryType: string;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
};

export interface ReconnectOptions {
  /** The shortest wait before a reconnection attempt, in ms (default 500). */
  minDelay?: number;
  /** The longest wait, in ms (default 30000). */
  maxDelay?: number;
}

export interface CrierOptions {
  /** "json" (default) or "msgpack" (needs `@msgpack/msgpack`). */
  encoding?: Encoding;
  /** The token (JWT or API key) of the first connection. */
  token?: string;
  /**
   * Gives a fresh token: for the first connection when `token` is not given, for every
   * reconnection, before the connection's token expires (sent with `auth`), and after 4002.
   */
  getToken?: () => string | Promise<string>;
  /** Backoff for reconnecting; `false` never reconnects. */
  reconnect?: ReconnectOptions | false;
  /**
   * Bytes in the socket's `bufferedAmount` above which publishes wait in the client's queue,
   * which holds at most this many bytes more (default 1 MiB); past it they fail with `buffer_full`.
   */
  highWaterMark?: number;
  /** How often to send keep-alive `ping` frames, in ms (default 5000; 0: never). */
  pingInterval?: number;
  /** Ask the server to batch frames (`?batch=1`). Batched frames are understood either way. */
  batch?: boolean;
  /** The WebSocket class to use (default: the global `WebSocket`, else the `ws` package). */
  WebSocket?: WebSocketConstructor;
  /** The MessagePack codec (default: `import("@msgpack/msgpack")`). */
  msgpack?: MsgpackCodec;
}

export interface SubscribeOptions {
  /** Replay the last N messages (of every matching topic, for a pattern) before live ones. */
  rewind?: number;
  /** "all" (default) or "latest": conflated, only the freshest value when the client falls behind. */
  mode?: "all" | "latest";
  /** With mode "latest": at most this many frames a second per topic. */
  maxRate?: number;
  /** Exact topics: resume after this position (a `Subscription.position` saved earlier). */
  since?: Position;
}

export interface PublishResult {
  /** The message's seq in its topic. */
  seq: number;
}

export interface ServerStats {
  /** Bytes the server held for this connection and its socket had not taken yet. */
  serverBufferedAmount: number;
  /** Messages the server dropped for this client so far (slow-consumer policy). */
  dropped: number;
}

/** Client codes beside the server's error codes. */
export type ClientErrorCode =
  | "buffer_full"
  | "disconnected"
  | "closed"
  | "unsubscribed"
  | "bad_data"
  | "bad_server_frame"
  | "connect_failed"
  | "connection_closed"
  | "token_failed"
  | "refused";

/** Error codes the server sends (proto/README.md), in `error` frames and refused upgrades. */
export type ServerErrorCode =
  | "bad_frame"
  | "unknown_op"
  | "invalid_topic"
  | "payload_too_large"
  | "too_many_subscriptions"
  | "unauthorized"
  | "forbidden"
  | "invalid_token"
  | "rate_limited"
  | "unavailable"
  | "bad_request"
  | "bad_handshake"
  | "origin_not_allowed"
  | "too_many_connections"
  | "shutting_down"
  | "upgrade_required";

export type ErrorCode = ServerErrorCode | ClientErrorCode | (string & {});

export declare class CrierError extends Error {
  constructor(
    code: string,
    message?: string,
    details?: { status?: number; topic?: string; closeCode?: number; cause?: unknown },
  );
  readonly name: "CrierError";
  /** The server's error code, or the client's. */
  readonly code: ErrorCode;
  /** For a refused upgrade (Node): the HTTP status. */
  readonly status?: number;
  /** The subscription the error is about. */
  readonly topic?: string;
  /** For `connect_failed` and `connection_closed`: the WebSocket close code. */
  readonly closeCode?: number;
}

export declare class Subscription {
  private constructor();
  /** The topic or pattern. */
  readonly topic: string;
  /** Exact topics: the stream's epoch and the last seq handled; null for a pattern or before the ack. */
  readonly position: Position | null;
  /** Acknowledged and not ended. */
  readonly active: boolean;
  /** Resolves once the server acknowledges it; rejects with a CrierError if it refuses. */
  readonly ready: Promise<Subscription>;
  /** Ends it; resolves once the server has (or at once when another subscription shares it). */
  unsubscribe(): Promise<void>;
}

/** The server's `welcome` frame. */
export interface Welcome {
  op: "welcome";
  connection: string;
  encoding: Encoding;
  server: string;
  batch?: boolean;
  authenticated?: boolean;
  user?: string;
  /** When the connection's token stops being accepted, in Unix seconds. */
  expires_at?: number;
  limits: {
    max_message_bytes: number;
    max_frame_bytes: number;
    max_buffered_bytes: number;
    max_subscriptions: number;
    slow_consumer: "drop-oldest" | "drop-newest" | "disconnect";
    ping_interval_ms: number;
    idle_timeout_ms: number;
    publish_rate?: number;
    max_bad_frames?: number;
    auth_timeout_ms?: number;
    [name: string]: unknown;
  };
  [name: string]: unknown;
}

export interface CrierOpenEvent extends Event {
  readonly type: "open";
  /** False for the first connection, true after a reconnection. */
  readonly reconnected: boolean;
  readonly welcome: Welcome;
}

export interface CrierCloseEvent extends Event {
  readonly type: "close";
  readonly code: number;
  readonly reason: string;
  readonly wasClean: boolean;
  /** True when the client reconnects next (a `reconnecting` event follows). */
  readonly willReconnect: boolean;
}

export interface CrierErrorEvent extends Event {
  readonly type: "error";
  /** A CrierError, or what a message handler threw. */
  readonly error: CrierError | unknown;
  readonly message: string;
}

export interface CrierReconnectingEvent extends Event {
  readonly type: "reconnecting";
  /** 1 for the first attempt since the last connection that stayed open for 5 s. */
  readonly attempt: number;
  /** The wait before it, in ms. */
  readonly delay: number;
}

export interface CrierGapEvent extends Event {
  readonly type: "gap";
  /** The topic whose messages were lost (for `reconnected`: the pattern). */
  readonly topic: string;
  /**
   * `epoch`: the topic's stream started afresh (a broker restart): reload its state;
   * `history`: history no longer reached back after a reconnect;
   * `dropped`: the server dropped messages while the client fell behind (or, after a 4008, the
   *   replay of what was missed could not be delivered: the topic resumes from its latest message);
   * `reconnected`: a pattern subscription cannot be recovered after a reconnect.
   */
  readonly reason: "epoch" | "history" | "dropped" | "reconnected";
  /** For a pattern subscription: the pattern. */
  readonly pattern?: string;
  /** Where the stream is now (exact topics). */
  readonly epoch?: string;
  readonly seq?: number;
  /** For `dropped`: how many seqs were skipped. */
  readonly missed?: number;
}

export interface CrierEventMap {
  open: CrierOpenEvent;
  close: CrierCloseEvent;
  error: CrierErrorEvent;
  reconnecting: CrierReconnectingEvent;
  gap: CrierGapEvent;
}

export declare class Crier extends EventTarget {
  constructor(url: string | URL, options?: CrierOptions);

  static readonly CONNECTING: 0;
  static readonly OPEN: 1;
  static readonly CLOSING: 2;
  static readonly CLOSED: 3;
  readonly CONNECTING: 0;
  readonly OPEN: 1;
  readonly CLOSING: 2;
  readonly CLOSED: 3;

  readonly url: string;
  readonly encoding: Encoding;
  /** CONNECTING (also while waiting to reconnect), OPEN once welcomed, CLOSING, CLOSED for good. */
  readonly readyState: ReadyState;
  /** The socket's `bufferedAmount` (0 while disconnected). */
  readonly bufferedAmount: number;
  /** The server's side: bytes it holds for this connection, as of the last `pong`. */
  readonly serverBufferedAmount: number;
  /** Messages the server dropped for this client, as of the last `pong`. */
  readonly dropped: number;
  /** The current connection's welcome, or null. */
  readonly welcome: Welcome | null;

  subscribe<T = unknown>(
    topic: string,
    onMessage: (message: Message<T>) => void,
    options?: SubscribeOptions,
  ): Subscription;
  publish(topic: string, data: unknown): Promise<PublishResult>;
  /** Sends a `ping` now and resolves with the server's figures from its `pong`. */
  refreshServerStats(): Promise<ServerStats>;
  /** Closes and stops reconnecting; resolves once closed. */
  close(code?: number, reason?: string): Promise<void>;

  /** addEventListener; returns a function that removes the listener. */
  on<K extends keyof CrierEventMap>(type: K, listener: (event: CrierEventMap[K]) => void): () => void;
  off<K extends keyof CrierEventMap>(type: K, listener: (event: CrierEventMap[K]) => void): void;

  addEventListener<K extends keyof CrierEventMap>(
    type: K,
    listener: (this: Crier, event: CrierEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof CrierEventMap>(
    type: K,
    listener: (this: Crier, event: CrierEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

export default Crier;

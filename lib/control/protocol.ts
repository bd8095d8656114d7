/**
 * The control API's shape: JSON-RPC 2.0 (https://www.jsonrpc.org/specification) error codes, the
 * method contract devices implement, and the parameter check the server runs before any method sees
 * its params. Transport: one JSON object per line on a unix socket (server.ts).
 */

/** JSON-RPC 2.0 §5.1 error codes. */
export const RpcErrorCode = {
  /** Invalid JSON (or not UTF-8). */
  PARSE_ERROR: -32700,
  /** Valid JSON that is not a request object (a batch array, no method, a line too long...). */
  INVALID_REQUEST: -32600,
  METHOD_NOT_FOUND: -32601,
  INVALID_PARAMS: -32602,
  /** The method failed. */
  INTERNAL_ERROR: -32603,
} as const;

export interface RpcErrorObject {
  code: number;
  message: string;
  /** `{ code }` when the failure was a VhostdError (its stable string code). */
  data?: unknown;
}

/** A method's refusal with a JSON-RPC code, e.g. INVALID_PARAMS for a value out of range. */
export class ControlError extends Error {
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(message);
    this.name = 'ControlError';
  }
}

export interface ParamSpec {
  type: 'string' | 'integer' | 'boolean';
  description: string;
  required?: boolean;
  /** Allowed values of a string. */
  choices?: readonly string[];
  /** Bounds of an integer, inclusive. */
  min?: number;
  max?: number;
}

/** A method of the control API. Params arrive checked against `params` (names, types, bounds). */
export interface ControlMethod {
  /** One line, shown by `vhostctl call methods`. */
  description: string;
  params?: Record<string, ParamSpec>;
  /** Returns a JSON-serializable result (numbers, not bigints). Throw ControlError to refuse. */
  call(params: Record<string, unknown>): unknown;
}

/**
 * The `device` param every method takes: the device the call is meant for. A daemon serves one device
 * now; naming it keeps callers right when one process serves several.
 */
export const DEVICE_PARAM: ParamSpec = { type: 'string', description: 'Device the call is for (must be the one this daemon serves)' };

/** Check `params` (a JSON object) against `spec`; throws ControlError(INVALID_PARAMS) on the first problem. */
export function checkParams(spec: Record<string, ParamSpec>, params: Record<string, unknown>): void {
  for (const name of Object.keys(params)) {
    if (!Object.hasOwn(spec, name)) throw invalidParams(`unknown param "${name}"; known: ${Object.keys(spec).join(', ')}`);
  }
  for (const [name, p] of Object.entries(spec)) {
    const value = params[name];
    if (value === undefined) {
      if (p.required === true) throw invalidParams(`missing param "${name}" (${p.type})`);
      continue;
    }
    const ok =
      p.type === 'integer' ? Number.isSafeInteger(value) : p.type === 'boolean' ? typeof value === 'boolean' : typeof value === 'string';
    if (!ok) throw invalidParams(`param "${name}": expected ${p.type === 'integer' ? 'an integer' : `a ${p.type}`}`);
    if (p.choices !== undefined && !p.choices.includes(value as string)) {
      throw invalidParams(`param "${name}": expected one of ${p.choices.join(', ')}`);
    }
    if ((p.min !== undefined && (value as number) < p.min) || (p.max !== undefined && (value as number) > p.max)) {
      throw invalidParams(`param "${name}": expected ${p.min ?? '-inf'}..${p.max ?? 'inf'}`);
    }
  }
}

function invalidParams(message: string): ControlError {
  return new ControlError(RpcErrorCode.INVALID_PARAMS, message);
}

/**
 * One line per event on stderr. Under systemd (JOURNAL_STREAM set) each line starts with a syslog
 * priority prefix (`<3>`), which journald turns into the entry's level; elsewhere the level is a word.
 * Fields are appended as `key=value`.
 */

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export const LOG_LEVELS: readonly LogLevel[] = ['debug', 'info', 'warn', 'error'];
export type LogFields = Record<string, string | number | boolean | undefined>;

export interface Logger {
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
}

/** The daemon's logger: its least severe level can change at run time (control API `log-level`). */
export interface LevelLogger extends Logger {
  level: LogLevel;
}

const RANK: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };
const SYSLOG_PRIORITY: Record<LogLevel, number> = { debug: 7, info: 6, warn: 4, error: 3 };

export interface StderrLoggerOptions {
  /** Least severe level printed. */
  level: LogLevel;
  /** Prefix every line with the syslog priority (journald). Defaults to whether JOURNAL_STREAM is set. */
  journal?: boolean;
  /** Where lines go (tests capture them). */
  write?: (line: string) => void;
}

export function createLogger(options: StderrLoggerOptions): LevelLogger {
  const journal = options.journal ?? process.env.JOURNAL_STREAM !== undefined;
  const write = options.write ?? ((line: string) => process.stderr.write(line));
  let min = RANK[options.level];
  const log = (level: LogLevel) => (message: string, fields?: LogFields) => {
    if (RANK[level] < min) return;
    let line = journal ? `<${SYSLOG_PRIORITY[level]}>${message}` : `${level}: ${message}`;
    if (fields !== undefined) {
      for (const [key, value] of Object.entries(fields)) {
        if (value !== undefined) line += ` ${key}=${typeof value === 'string' && /\s/.test(value) ? JSON.stringify(value) : value}`;
      }
    }
    write(line.replace(/\n/g, ' | ') + '\n');
  };
  return {
    debug: log('debug'),
    info: log('info'),
    warn: log('warn'),
    error: log('error'),
    get level(): LogLevel {
      return LOG_LEVELS[min]!;
    },
    set level(level: LogLevel) {
      min = RANK[level];
    },
  };
}

/** A logger that drops everything (library default and quiet tests). */
export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };

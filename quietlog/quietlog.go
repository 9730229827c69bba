// Package quietlog writes warnings that strangers can provoke (refused
// handshakes, hostile frames, floods) at most once per key and interval.
package quietlog

import (
	"log/slog"
	"sync"
	"time"
)

// Log writes a repeated warning once per key and interval, saying how
// many were held back since: a flood cannot flood the log.
type Log struct {
	log      *slog.Logger
	interval time.Duration

	mu   sync.Mutex // guards keys
	keys map[string]*entry
}

type entry struct {
	next       time.Time
	suppressed int
}

// MaxKeys bounds the keys a Log tracks; past it, new keys share one.
const MaxKeys = 4096

func New(log *slog.Logger, interval time.Duration) *Log {
	return &Log{log: log, interval: interval, keys: make(map[string]*entry)}
}

// Warn logs msg with args unless key was logged within the interval.
func (q *Log) Warn(key, msg string, args ...any) {
	now := time.Now()
	q.mu.Lock()
	k := q.keys[key]
	if k != nil && now.Before(k.next) {
		k.suppressed++
		q.mu.Unlock()
		return
	}
	if k == nil {
		if len(q.keys) >= MaxKeys {
			for key, k := range q.keys {
				if now.After(k.next) {
					delete(q.keys, key)
				}
			}
		}
		if len(q.keys) >= MaxKeys {
			// Still full: every key not yet known shares one, so the map
			// stays bounded and the log quiet.
			key = ""
		}
		if k = q.keys[key]; k != nil && now.Before(k.next) {
			k.suppressed++
			q.mu.Unlock()
			return
		}
		if k == nil {
			k = &entry{}
			q.keys[key] = k
		}
	}
	n := k.suppressed
	k.next, k.suppressed = now.Add(q.interval), 0
	q.mu.Unlock()
	if n > 0 {
		args = append(args, "repeated", n, "over", q.interval)
	}
	q.log.Warn(msg, args...)
}

// Len is how many keys q tracks.
func (q *Log) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.keys)
}

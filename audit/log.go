package audit

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/kms"
)

// Config sets up a Log.
type Config struct {
	Store kms.AuditStore
	// PublicKey is the identity public key; Sign signs with its private half.
	PublicKey []byte
	Sign      func(ctx context.Context, msg []byte) ([]byte, error)
	// Every makes a checkpoint once this many records are uncovered
	// (default 1000); Interval makes one this often when any are (default
	// 10s).
	Every    uint64
	Interval time.Duration
	Logger   *slog.Logger
}

// Log makes signed checkpoints of the audit tree and answers proofs.
type Log struct {
	cfg    Config
	origin string
	mu     sync.Mutex // serializes checkpoints
	last   uint64
}

// New returns a Log.
func New(cfg Config) *Log {
	if cfg.Every == 0 {
		cfg.Every = 1000
	}
	if cfg.Interval == 0 {
		cfg.Interval = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Log{cfg: cfg, origin: Origin(cfg.PublicKey)}
}

// HashReader reads the tree's stored hashes.
func (l *Log) HashReader(ctx context.Context) tlog.HashReader { return HashReader(ctx, l.cfg.Store) }

// HashReader reads a log's stored tree hashes from its store.
func HashReader(ctx context.Context, s kms.AuditStore) tlog.HashReader {
	return tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		hs, err := s.AuditHashes(ctx, idx)
		if err != nil {
			return nil, err
		}
		out := make([]tlog.Hash, len(hs))
		for i, h := range hs {
			out[i] = h
		}
		return out, nil
	})
}

// Checkpoint signs and stores a checkpoint of the whole tree if it grew since
// the last one. It returns the tree size covered.
func (l *Log) Checkpoint(ctx context.Context) (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last == 0 {
		if n, _, err := l.cfg.Store.LatestCheckpoint(ctx); err == nil {
			l.last = n
		} else if !errors.Is(err, kms.ErrNotFound) {
			return 0, err
		}
	}
	size, err := l.cfg.Store.AuditSize(ctx)
	if err != nil {
		return 0, err
	}
	if size == 0 || size == l.last {
		return l.last, nil
	}
	root, err := tlog.TreeHash(int64(size), l.HashReader(ctx))
	if err != nil {
		return 0, err
	}
	signer := NewNoteSigner(l.cfg.PublicKey, func(msg []byte) ([]byte, error) { return l.cfg.Sign(ctx, msg) })
	msg, err := SignCheckpoint(Checkpoint{Origin: l.origin, Size: size, Root: root}, signer)
	if err != nil {
		return 0, err
	}
	if err := l.cfg.Store.PutCheckpoint(ctx, size, msg); err != nil {
		return 0, err
	}
	l.last = size
	return size, nil
}

// Run makes a checkpoint at once (covering whatever a crash left), then
// whenever Every records are uncovered or Interval passed with any
// uncovered, and a last one when ctx ends.
func (l *Log) Run(ctx context.Context) {
	check := func(ctx context.Context) {
		if _, err := l.Checkpoint(ctx); err != nil {
			l.cfg.Logger.Error("audit checkpoint", "err", err)
		}
	}
	check(ctx)
	poll := min(l.cfg.Interval, time.Second)
	t := time.NewTicker(poll)
	defer t.Stop()
	lastTime := time.Now()
	for {
		select {
		case <-ctx.Done():
			check(context.Background())
			return
		case <-t.C:
		}
		size, err := l.cfg.Store.AuditSize(ctx)
		if err != nil {
			continue
		}
		l.mu.Lock()
		uncovered := size - l.last
		l.mu.Unlock()
		if uncovered >= l.cfg.Every || (uncovered > 0 && time.Since(lastTime) >= l.cfg.Interval) {
			check(ctx)
			lastTime = time.Now()
		}
	}
}

// Latest returns the newest signed checkpoint.
func (l *Log) Latest(ctx context.Context) ([]byte, error) {
	_, msg, err := l.cfg.Store.LatestCheckpoint(ctx)
	return msg, err
}

func (l *Log) checkSizes(ctx context.Context, a, b uint64, strict bool) error {
	size, err := l.cfg.Store.AuditSize(ctx)
	if err != nil {
		return err
	}
	if b > size || a > b || (strict && a == b) {
		return kms.Errorf(kms.KindInvalid, "need %d %s %d <= %d (the log size)", a, map[bool]string{true: "<", false: "<="}[strict], b, size)
	}
	return nil
}

// InclusionProof proves record index is in the tree of the given size.
func (l *Log) InclusionProof(ctx context.Context, index, size uint64) ([][32]byte, error) {
	if err := l.checkSizes(ctx, index, size, true); err != nil {
		return nil, err
	}
	p, err := tlog.ProveRecord(int64(size), int64(index), l.HashReader(ctx))
	return hashes(p), err
}

// ConsistencyProof proves the tree of size old is a prefix of the tree of
// the given size.
func (l *Log) ConsistencyProof(ctx context.Context, old, size uint64) ([][32]byte, error) {
	if err := l.checkSizes(ctx, old, size, false); err != nil {
		return nil, err
	}
	if old == 0 {
		return nil, kms.Errorf(kms.KindInvalid, "old must be at least 1")
	}
	p, err := tlog.ProveTree(int64(size), int64(old), l.HashReader(ctx))
	return hashes(p), err
}

func hashes(p []tlog.Hash) [][32]byte {
	out := make([][32]byte, len(p))
	for i, h := range p {
		out[i] = h
	}
	return out
}

var _ note.Signer = noteSigner{}

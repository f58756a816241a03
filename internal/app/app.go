// Package app is the one place that wires kmsd's stack: the HE blob store,
// the key kinds, the service over a store and a sealer, start-up recovery
// (blobs no committed version lists), the identity and bootstrap admin
// token, the audit log and its checkpoints, the REST API, and the
// background work (scheduled destruction, refusal summaries, token-use
// flushes). kmsd, kmsbench and the tests build through it; transports
// (TLS, listeners) stay with their callers.
package app

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kmsd-project/kmsd/api"
	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/internal/metrics"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/archive"
	"golang.org/x/mod/sumdb/tlog"
)

// Config is what New wires.
type Config struct {
	Store      kms.Store
	AuditStore kms.AuditStore // the audit log's store (the bbolt store, or a wrapper of it); required unless Unaudited
	Sealer     kms.Sealer
	BlobDir    string   // HE public and evaluation keys in a local directory
	Blobs      he.Blobs // or in this store (S3, say); neither: no HE kinds
	// OrphanGrace is how old a blob no committed version lists must be
	// before it is removed as an interrupted generation's. Zero (one
	// process owns the blobs): at once, at start. Above zero (replicas
	// share them, and another may be generating): older blobs only, at
	// start and then under the "blobs" leader every OrphanGrace.
	OrphanGrace time.Duration
	HEWorkers   int // goroutines per HE keyset generation; 0: one per core
	// HEFullKeys stores new HE keys in their full form instead of the
	// seeded one (he/seedkey): for clients whose SDK cannot expand.
	HEFullKeys bool
	Logger     *slog.Logger
	// Service tunes the service; New sets its Store, Sealer, Kinds, Logger
	// and Audit.
	Service kms.Config
	// Unaudited turns the audit log off: for benchmarks that measure what
	// it costs, never for kmsd serving.
	Unaudited     bool
	AuditEvery    uint64
	AuditInterval time.Duration
	// API tunes the API (limits, stream); New sets Audit, Prover, Blobs
	// and Background.
	API api.Options
	// AdminToken receives the bootstrap admin token when a new data dir
	// gets one, and "" if another replica made the first token after all
	// (the text must then be withdrawn).
	AdminToken      func(token string) error
	DestroyInterval time.Duration // default 1 minute
	// Lead runs work (checkpoint signing, scheduled destruction) while
	// this process leads for role; replicas elect one (etcd.Store.Lead).
	// Nil: a single process, which always leads.
	Lead func(ctx context.Context, role string, work func(context.Context))
	// Archive, if set, is where the audit log is kept as a tlog-tiles
	// log: whatever a checkpoint covers is written there (by the
	// "archive" leader) and served under /v1/audit/tiles/.
	Archive archive.Bucket
	// ArchiveProgress keeps in the store how far the archive went (kmsd:
	// the store's metadata), so that an archive rolled back or wiped is
	// found.
	ArchiveProgress archive.Progress
	// ArchiveInterval is how often the archive catches up with the
	// newest checkpoint (default 1s).
	ArchiveInterval time.Duration
	// AuditRetain, with an Archive, prunes from the store the records
	// older than this once the archive holds them durably; they are then
	// read from the archive. Zero: the store keeps every record.
	AuditRetain time.Duration
	// Metrics, if set, receives kmsd's Prometheus metrics (the caller
	// serves them).
	Metrics *metrics.Registry
	// Peers, if set, are the kmsd nodes threshold keys are shared with
	// (--peers).
	Peers *api.Peers
}

// prunable is an audit store that can prune to an archive (the audit
// engine over a store that prunes).
type prunable interface {
	CanPrune() bool
	SetCold(engine.Cold)
	TrustedRoot(ctx context.Context, n uint64) (tlog.Hash, error)
	Prune(ctx context.Context, below uint64) (int, error)
	PrunedBelow() uint64
}

// App is a wired kmsd.
type App struct {
	Service        *kms.Service
	Audit          *audit.Log      // nil when unaudited
	Archiver       *archive.Writer // nil without an archive
	pruner         prunable        // nil without retention
	cold           *archive.Cold   // the archive's reader (proven against the store's root)
	failingSince   atomic.Int64    // unix ns since the archive fails to be written; 0: it does not
	seenMu         sync.Mutex
	seen           uint64 // the archive's checkpoint size, as a non-leading replica last read it
	seenCheckpoint uint64 // the store's newest checkpoint's size, last read
	seenAt         time.Time
	Blobs          he.Blobs
	API            *api.Server
	Identity       []byte // the identity public key
	OrphansRemoved int    // blobs of interrupted generations removed at start
	AdminTokenMade bool

	kek     kekState
	metrics *appMetrics // nil without Config.Metrics

	cfg       Config
	log       *slog.Logger
	bgStop    context.CancelFunc
	bgCtx     context.Context
	stop      context.CancelFunc // maintenance and refusal summaries
	stopAudit context.CancelFunc // the checkpoint loop, stopped last
	started   bool
	done      []chan struct{}
	auditDone chan struct{}
}

// blobSource adapts the HE blob store to the API.
type blobSource struct{ s he.Blobs }

func (b blobSource) Open(ctx context.Context, digest string) (io.ReadSeekCloser, error) {
	return b.s.Open(ctx, he.Digest(digest))
}

// New wires the stack and does start-up recovery; nothing runs in the
// background until Start.
func New(ctx context.Context, cfg Config) (*App, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Store == nil || cfg.Sealer == nil {
		return nil, fmt.Errorf("app: a store and a sealer are required")
	}
	if !cfg.Unaudited && cfg.AuditStore == nil {
		return nil, fmt.Errorf("app: an audit store is required (Unaudited is for benchmarks only)")
	}
	a := &App{cfg: cfg, log: log}
	kinds := pqc.Kinds()
	switch {
	case cfg.Blobs != nil:
		a.Blobs = cfg.Blobs
	case cfg.BlobDir != "":
		blobs, err := he.OpenDirBlobs(cfg.BlobDir)
		if err != nil {
			return nil, fmt.Errorf("blob store: %w", err)
		}
		a.Blobs = blobs
	}
	if a.Blobs != nil {
		kinds = append(kinds, he.Kinds(a.Blobs, cfg.HEWorkers, !cfg.HEFullKeys)...)
	}
	sc := cfg.Service
	sc.Store, sc.Sealer, sc.Kinds, sc.Logger, sc.Audit = cfg.Store, cfg.Sealer, kms.NewRegistry(kinds...), log, !cfg.Unaudited
	if cfg.Peers != nil {
		sc.Peers = cfg.Peers
	}
	svc, err := kms.NewService(sc)
	if err != nil {
		return nil, err
	}
	a.Service = svc
	if a.Blobs != nil {
		// Blobs of a generation a crash interrupted belong to no committed
		// version: remove them before serving.
		if a.OrphansRemoved, err = a.removeOrphans(ctx); err != nil {
			return nil, fmt.Errorf("blob store: %w", err)
		}
	}
	// The KEKs the store is sealed under (after a rotation, more than
	// the one kmsd opened the HSM by), before anything is unsealed.
	if err := a.followRing(); err != nil {
		return nil, fmt.Errorf("KEK ring: %w", err)
	}
	if err := a.checkRing(ctx); err != nil {
		return nil, fmt.Errorf("KEK ring: %w", err)
	}
	if err := svc.EnsureIdentity(ctx); err != nil {
		return nil, fmt.Errorf("identity key: %w", err)
	}
	if cfg.AdminToken != nil {
		if a.AdminTokenMade, err = svc.EnsureAdminToken(ctx, cfg.AdminToken); err != nil {
			return nil, fmt.Errorf("admin token: %w", err)
		}
	}
	if _, a.Identity, err = svc.Identity(ctx); err != nil {
		return nil, fmt.Errorf("identity key: %w", err)
	}
	if cfg.Peers != nil {
		cfg.Peers.SetIdentity(func(ctx context.Context, msg, context []byte) ([]byte, error) {
			sig, _, err := svc.SignAsIdentity(ctx, msg, context)
			return sig, err
		}, func() []byte {
			_, pub, err := svc.Identity(context.Background())
			if err != nil {
				return nil
			}
			return pub
		})
	}
	// Background operations (large HE generations) end with the app: an
	// interrupted one commits nothing and its blobs are removed at the
	// next start.
	a.bgCtx, a.bgStop = context.WithCancel(context.Background())
	opts := cfg.API
	if cfg.Peers != nil {
		opts.Peers = cfg.Peers
	}
	opts.Background = a.bgCtx
	if a.Blobs != nil {
		opts.Blobs = blobSource{a.Blobs}
	}
	if !cfg.Unaudited {
		a.Audit = audit.New(audit.Config{Store: cfg.AuditStore, PublicKey: a.Identity, Every: cfg.AuditEvery, Interval: cfg.AuditInterval, Logger: log,
			Sign: func(ctx context.Context, msg []byte) ([]byte, error) {
				sig, _, err := svc.SignAsIdentity(ctx, msg, nil)
				return sig, err
			}})
		opts.Audit, opts.Prover = cfg.AuditStore, a.Audit
		p, _ := cfg.AuditStore.(prunable)
		if cfg.Archive != nil {
			a.Archiver = &archive.Writer{Bucket: cfg.Archive, Store: cfg.AuditStore, Logger: log, Progress: cfg.ArchiveProgress}
			opts.Tiles = cfg.Archive
			opts.ArchiveStatus = a.archiveStatus
			if p != nil {
				a.cold = &archive.Cold{Bucket: cfg.Archive, Root: p.TrustedRoot}
				p.SetCold(a.cold)
				a.Archiver.Root = p.TrustedRoot
			}
		}
		if cfg.AuditRetain > 0 {
			if cfg.Archive == nil {
				return nil, fmt.Errorf("audit retention needs an archive to keep the records it prunes (--audit-archive)")
			}
			if p == nil || !p.CanPrune() {
				return nil, fmt.Errorf("audit retention: this store cannot prune its audit log")
			}
			a.pruner = p
		}
		if p != nil && p.PrunedBelow() > 0 && cfg.Archive == nil {
			log.Error("the store's audit log was pruned to an archive: records below this index are read from it, and kmsd was started without one (--audit-archive): reading them fails", "pruned_below", p.PrunedBelow())
		}
	} else {
		opts.Audit, opts.Prover = nil, nil
	}
	a.kek.kick = make(chan struct{}, 1)
	nonce := make([]byte, 8)
	_, _ = crand.Read(nonce)
	a.kek.nonce = hex.EncodeToString(nonce)
	opts.KEK = a
	if _, ok := cfg.Store.(store.Dumper); ok {
		opts.Backup = func(ctx context.Context, w io.Writer, withBlobs bool) (string, error) {
			sum, id, err := a.Backup(ctx, w, withBlobs)
			if err == nil {
				log.Info("backup taken", "id", id, "keys", sum.Keys, "versions", sum.Versions, "tokens", sum.Tokens, "audit_size", sum.AuditSize, "blobs", sum.Blobs, "blob_bytes", sum.BlobBytes)
			}
			return id, err
		}
	}
	if cfg.Metrics != nil {
		a.metrics = newMetrics(a, cfg.Metrics)
		opts.Metrics = a.metrics
	}
	a.API = api.New(svc, log, opts)
	return a, nil
}

// removeOrphans removes the blobs no committed version lists that are
// older than OrphanGrace.
func (a *App) removeOrphans(ctx context.Context) (int, error) {
	// A generation that runs longer than OrphanGrace could lose its
	// blobs here: OrphanGrace must be well above the longest one.
	before := time.Now().Add(-a.cfg.OrphanGrace)
	keep, err := a.Service.ReferencedBlobs(ctx)
	if err != nil {
		return 0, err
	}
	keepD := map[he.Digest]bool{}
	for d := range keep {
		keepD[he.Digest(d)] = true
	}
	n, err := a.Blobs.RemoveOrphans(ctx, keepD, before)
	if n > 0 {
		a.log.Info("removed blobs no committed version lists (an interrupted generation)", "count", n, "older_than", a.cfg.OrphanGrace.String())
	}
	return n, err
}

// Handler is the REST API.
func (a *App) Handler() http.Handler { return a.API.Handler() }

// Start runs the background work: audit checkpoints, scheduled
// destruction, the summaries of refused requests.
func (a *App) Start() {
	if a.started {
		return
	}
	a.started = true
	ctx, cancel := context.WithCancel(context.Background())
	a.stop = cancel
	interval := a.cfg.DestroyInterval
	if interval <= 0 {
		interval = time.Minute
	}
	run := func(f func()) chan struct{} {
		d := make(chan struct{})
		go func() { defer close(d); f() }()
		return d
	}
	lead := a.cfg.Lead
	if lead == nil {
		lead = func(ctx context.Context, _ string, work func(context.Context)) { work(ctx) }
	}
	if a.metrics != nil {
		lead = a.metrics.lead(lead)
	}
	if a.Audit != nil {
		actx, acancel := context.WithCancel(context.Background())
		a.stopAudit = acancel
		a.auditDone = run(func() { lead(actx, "checkpoints", a.Audit.Run) }) // signs a last checkpoint when actx ends
	}
	a.done = append(a.done,
		run(func() {
			lead(ctx, "destruction", func(ctx context.Context) { a.Service.RunDestruction(ctx, interval) })
		}),
		run(func() { lead(ctx, "rotation", a.Service.RunRotation) }),
		run(func() { a.Service.RunTokenUseFlush(ctx, interval) }), // every replica, for the uses it saw
		run(func() {
			if a.Blobs == nil || a.cfg.OrphanGrace <= 0 {
				return
			}
			lead(ctx, "blobs", func(ctx context.Context) {
				t := time.NewTicker(a.cfg.OrphanGrace)
				defer t.Stop()
				for {
					select {
					case <-ctx.Done():
						return
					case <-t.C:
					}
					if _, err := a.removeOrphans(ctx); err != nil && ctx.Err() == nil {
						a.log.Error("blob store: removing orphans", "err", err)
					}
				}
			})
		}),
		run(func() { a.API.Run(ctx) }))
	if a.Archiver != nil {
		a.done = append(a.done, run(func() { lead(ctx, "archive", a.runArchive) }))
	}
	if _, _, err := a.kekParts(); err == nil {
		a.done = append(a.done, run(func() { a.runRing(ctx) }), run(func() { lead(ctx, "kek", a.runRewrap) }))
	}
}

// archiveStatus is where the archive stands, for /readyz.
func (a *App) archiveStatus(ctx context.Context) *client.ArchiveStatus {
	archived, checkpoint := a.archivedSeen(ctx)
	st := &client.ArchiveStatus{Archived: archived}
	if checkpoint > archived {
		st.Lag = checkpoint - archived
	}
	if a.pruner != nil {
		st.PrunedBelow = a.pruner.PrunedBelow()
	}
	if ns := a.failingSince.Load(); ns != 0 {
		st.FailingSince = time.Unix(0, ns).UTC().Format(time.RFC3339)
	}
	return st
}

// archivedSeen is what the archive covers (what this process's writer
// last wrote, or, on a replica that does not lead the archiving, what the
// archive's checkpoint says) and the size of the store's newest
// checkpoint, read at most once a second (an unauthenticated /readyz
// must not become a stream of reads of the store or the bucket).
func (a *App) archivedSeen(ctx context.Context) (archived, checkpoint uint64) {
	a.seenMu.Lock()
	defer a.seenMu.Unlock()
	if time.Since(a.seenAt) >= time.Second {
		a.seenAt = time.Now()
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if size, _, err := a.cfg.AuditStore.LatestCheckpoint(rctx); err == nil {
			a.seenCheckpoint = size
		}
		if a.Archiver.Archived() == 0 {
			if b, err := a.cfg.Archive.Get(rctx, layout.CheckpointPath); err == nil {
				if n, err := archive.CheckpointSize(b); err == nil {
					a.seen = n
				}
			}
		}
	}
	archived = a.Archiver.Archived()
	if archived == 0 {
		archived = a.seen
	}
	return archived, a.seenCheckpoint
}

// retain prunes from the store the records older than AuditRetain that
// the archive holds (the first archived records of all, up to `archived`):
// it finds the first younger record by a binary search over their times.
func (a *App) retain(ctx context.Context, archived uint64) error {
	lo, hi := a.pruner.PrunedBelow(), archived
	if lo >= hi {
		return nil
	}
	cutoff := time.Now().Add(-a.cfg.AuditRetain)
	for lo < hi {
		mid := lo + (hi-lo)/2
		recs, err := a.cfg.AuditStore.AuditRecords(ctx, mid, mid+1)
		if err != nil {
			return fmt.Errorf("retention: read record %d: %w", mid, err)
		}
		r, err := kms.DecodeAuditRecord(recs[0])
		if err != nil {
			return fmt.Errorf("retention: record %d: %w", mid, err)
		}
		t, err := time.Parse(time.RFC3339Nano, r.Time)
		if err != nil {
			return fmt.Errorf("retention: record %d: time %q: %w", mid, r.Time, err)
		}
		if t.Before(cutoff) {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo <= a.pruner.PrunedBelow() {
		return nil
	}
	// The store's copy goes only where the archive holds the same bytes:
	// an archive edited since it was written is not trusted with them.
	for start := a.pruner.PrunedBelow(); start < lo; start += 4096 {
		end := min(lo, start+4096)
		hot, err := a.cfg.AuditStore.AuditRecords(ctx, start, end)
		if err != nil {
			return fmt.Errorf("retention: read records [%d, %d): %w", start, end, err)
		}
		arch, err := a.cold.ColdRecords(ctx, start, end)
		if err != nil {
			return fmt.Errorf("retention: read records [%d, %d) from the archive: %w", start, end, err)
		}
		for i := range hot {
			if i >= len(arch) || string(hot[i]) != string(arch[i]) {
				return fmt.Errorf("retention: the archive does not hold record %d as the store does; nothing is pruned (check the archive: kmsctl audit verify --archive)", start+uint64(i))
			}
		}
	}
	n, err := a.pruner.Prune(ctx, lo)
	if err != nil {
		return fmt.Errorf("retention: prune below %d: %w", lo, err)
	}
	a.log.Debug("audit retention: pruned the store's rows of archived records", "below", lo, "rows", n)
	return nil
}

// archivePass is one Sync; a panic in it (a bug reached through what the
// archive holds) is an error of the pass, never the end of kmsd.
func (a *App) archivePass(ctx context.Context) (n uint64, err error) {
	defer func() {
		if r := recover(); r != nil {
			n, err = a.Archiver.Archived(), fmt.Errorf("archive pass failed: %v", r)
		}
	}()
	return a.Archiver.Sync(ctx)
}

// retainPass is retain, a panic in it an error of the pass.
func (a *App) retainPass(ctx context.Context, archived uint64) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("retention pass failed: %v", r)
		}
	}()
	return a.retain(ctx, archived)
}

// runArchive brings the archive up to the newest checkpoint every
// ArchiveInterval until ctx ends. While it fails (a full or unwritable
// archive, S3 down) kmsd goes on serving and auditing: the log says so
// when it starts failing, every minute while it does, and when it
// recovers.
func (a *App) runArchive(ctx context.Context) {
	every := a.cfg.ArchiveInterval
	if every <= 0 {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var failingSince, lastSaid time.Time
	for {
		n, err := a.archivePass(ctx)
		if err == nil && a.pruner != nil {
			if rerr := a.retainPass(ctx, n); rerr != nil && ctx.Err() == nil {
				// Nothing is lost: the store keeps what it did not prune.
				a.log.Warn("audit retention: the store keeps its rows for now; retrying at the next archive pass", "err", rerr)
			}
		}
		switch {
		case err != nil && ctx.Err() == nil:
			if failingSince.IsZero() {
				failingSince = time.Now()
				a.failingSince.Store(failingSince.UnixNano())
			}
			if time.Since(lastSaid) >= time.Minute {
				a.log.Error("audit archive: cannot write; kmsd goes on serving and auditing, and archives the rest when it can", "archive", a.cfg.Archive.String(), "archived", n, "failing_for", time.Since(failingSince).Round(time.Second).String(), "err", err)
				lastSaid = time.Now()
			}
		case err == nil && !failingSince.IsZero():
			a.failingSince.Store(0) // before the log line: /readyz agrees with it
			a.log.Info("audit archive: writing again", "archive", a.cfg.Archive.String(), "archived", n, "failed_for", time.Since(failingSince).Round(time.Second).String())
			failingSince, lastSaid = time.Time{}, time.Time{}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Close stops background operations and the background work, writes down
// token uses, and last stops the checkpoint loop, so that its final
// checkpoint covers every record the rest made (a destruction's, say);
// call it after the HTTP server drained and before the store and the
// sealer close.
func (a *App) Close() {
	a.bgStop()
	if a.stop != nil {
		a.stop()
	}
	for _, d := range a.done {
		<-d
	}
	a.done = nil
	if err := a.Service.FlushTokenUse(context.Background()); err != nil {
		a.log.Warn("writing down token use", "err", err)
	}
	if a.stopAudit != nil {
		a.stopAudit()
		<-a.auditDone
		a.stopAudit = nil
	}
}

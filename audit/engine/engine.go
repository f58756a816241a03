// Package engine is the audit log's engine: the hash chain, the Merkle tree
// hashes, the group commit and the write-ahead journal. A store keeps the
// log's rows through the narrow port Rows; the engine decides what the rows
// are.
//
// A row is
//
//	k (1 byte) | k tree hashes (32 bytes each) | canonical record
//
// where the hashes are the ones tlog.StoredHashes says writing the record
// stores: its leaf hash, then the hashes of the subtrees it completes, by
// level. Keeping them beside the record lets a store write one value per
// record and lets proofs read them back by index.
//
// Records reach the rows two ways. A state change carries its records into
// the store's own transaction (Stage), so the change and its record commit
// together. A request that changes nothing appends its record through the
// group commit (AppendAudit): with a journal (a local store), a group is one
// journal frame and one fdatasync, and the journal's records move into the
// store in large batches in the background; without one (a replicated
// store), a group is one store transaction.
//
// A replicated store does not Stage: its transactions keep their records
// pending, in commit order, and it seals them into rows apart (Seal), so
// that replicas do not race each other for the log's end on every
// transaction; it settles what is pending before every read (Settler).
package engine

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/kms"
)

// Rows is the port a store implements for the audit log: opaque rows at
// indexes 0, 1, ... and signed checkpoints.
//
// A store writes rows only inside its own transactions: a transaction that
// carries audit records calls Log.Stage, writes the batch's rows at
// First, First+1, ... (refusing with ErrConflict if the store's rows do not
// end at First), commits, and calls Batch.Done with the outcome before it
// starts the next such transaction. A replicated store instead keeps its
// transactions' records pending and writes rows through Log.Seal.
type Rows interface {
	// WriteAudit runs a transaction of the store's own that stages recs
	// and changes nothing else. It is called with recs empty to move rows
	// waiting in the journal into the store.
	WriteAudit(ctx context.Context, recs []*kms.AuditRecord) error
	// RowsEnd returns the index after the last row.
	RowsEnd(ctx context.Context) (uint64, error)
	// ReadRows returns the rows [start, end), which must exist.
	ReadRows(ctx context.Context, start, end uint64) ([][]byte, error)
	// PutCheckpoint stores a signed checkpoint of the tree at size.
	PutCheckpoint(ctx context.Context, size uint64, note []byte) error
	// LatestCheckpoint returns the newest checkpoint; kms.ErrNotFound if
	// none.
	LatestCheckpoint(ctx context.Context) (uint64, []byte, error)
}

// HeadReader is implemented by a store that keeps the head its last Seal
// wrote: the log loads its position from it in one read. ReadHead
// returns nil if the store has none (a log written before heads).
type HeadReader interface {
	ReadHead(ctx context.Context) ([]byte, error)
}

// Settler is implemented by a store whose records become rows some time
// after they are durable: a replicated store keeps its replicas' records
// pending, in commit order, and seals them into rows (Seal) apart. The
// log calls Settle before every read, so that a read sees every record
// acknowledged before it.
type Settler interface {
	Settle(ctx context.Context) error
}

// Pruner is implemented by a store that can drop the rows of records an
// archive holds (retention).
type Pruner interface {
	// PruneRows deletes, in one transaction, up to the store's own limit
	// of the rows below `below` that Keep(below) does not hold, and
	// records `below` as the index under which rows may be absent. Where
	// the store was pruned further already (another replica), it prunes
	// to that index instead, with that index's Keep: the rows a pruned
	// log keeps are always those of the index it records. It returns how
	// many rows it deleted: 0 when none is left to delete.
	PruneRows(ctx context.Context, below uint64) (int, error)
	// PrunedBelow is the index under which rows may be absent (0: none
	// pruned).
	PrunedBelow(ctx context.Context) (uint64, error)
}

// Cold serves what pruned rows held, from an archive of the log: the
// records, and the tree hashes by storage index (tlog numbering).
type Cold interface {
	ColdRecords(ctx context.Context, start, end uint64) ([][]byte, error)
	ColdHashes(ctx context.Context, indexes []int64) ([]tlog.Hash, error)
}

// Keep is the rows a log pruned below `below` keeps: the row of the last
// record of each complete subtree in the binary decomposition of below
// (at most 64). They hold every hash of the records below `below` that
// the log ever needs again for its own work: the hashes a tree of any
// size from below on combines (checkpoints), the left siblings of every
// later record's subtrees (appends), and the position a store without a
// head loads at start. Proofs and records of other pruned indexes come
// from the archive (Cold).
func Keep(below uint64) func(uint64) bool {
	keep := map[uint64]bool{}
	for i := 63; i >= 0; i-- {
		if below&(1<<i) != 0 {
			keep[below&^(1<<i-1)-1] = true
		}
	}
	return func(n uint64) bool { return keep[n] }
}

// ErrConflict is returned by a Seal's write whose rows do not start where
// the store's end: another replica sealed first. The engine takes the
// position the write found; the store retries.
var ErrConflict = errors.New("audit: the log grew under this transaction (another writer appended first)")

// Options tune a Log.
type Options struct {
	// JournalPath is the write-ahead journal's file (none if empty): only
	// for a store that no other process writes.
	JournalPath string
	// JournalSize is the journal's size (default DefaultWALSize).
	JournalSize int64
	// MaxGroup bounds the records of one group commit (default 4096): a
	// store whose transactions hold a bounded number of operations (etcd:
	// 128 by default) sets it below that.
	MaxGroup int
}

// Log is the audit log's engine: a kms.AuditStore over a store's Rows.
type Log struct {
	rows     Rows
	maxGroup int

	appendCh       chan appendReq
	flushCh        chan struct{}
	quit           chan struct{}
	stopped        chan struct{}
	flusherStopped chan struct{}
	closeOnce      sync.Once
	started        bool

	groups       atomic.Uint64
	walSyncs     atomic.Uint64
	flushErrors  atomic.Uint64
	conflicts    atomic.Uint64
	expected     atomic.Int64
	recreated    atomic.Uint64
	walRecovered int
	walMissing   bool

	// mu orders the log: it guards the position (next, front, stale),
	// pending and the journal. A store transaction that stages records
	// holds it from Stage to Done. Lock order: the store's writer lock,
	// then mu.
	mu      sync.Mutex
	next    uint64      // index of the next record
	front   []tlog.Hash // front[l]: hash of the last complete subtree at level l
	stale   bool        // the position may be behind the rows (after a Seal that lost or was not answered)
	pending [][]byte    // rows durable in the journal only: [next-len(pending), next)

	pruneMu     sync.Mutex    // one Prune at a time
	prunedBelow atomic.Uint64 // rows below it may be absent: read from cold
	cold        Cold

	wal        *wal // nil without a journal
	walPath    string
	walSize    int64
	walBroken  bool
	walGone    bool
	recreateMu sync.Mutex
}

var _ kms.AuditStore = (*Log)(nil)

// New returns a Log over rows; Start loads its position and starts it. A
// store makes the Log first, so that the Log's recovery can write through
// the store's transactions.
func New(rows Rows, o Options) *Log {
	if o.JournalSize == 0 {
		o.JournalSize = DefaultWALSize
	}
	if o.MaxGroup <= 0 || o.MaxGroup > maxGroup {
		o.MaxGroup = maxGroup
	}
	return &Log{rows: rows, maxGroup: o.MaxGroup, walPath: o.JournalPath, walSize: o.JournalSize,
		appendCh: make(chan appendReq, maxGroup), flushCh: make(chan struct{}, 1),
		quit: make(chan struct{}), stopped: make(chan struct{}), flusherStopped: make(chan struct{})}
}

// Start loads the log's position from the rows, copies into them the
// records the journal holds past their end (groups acknowledged before a
// crash), checking that they continue the log, resets the journal, and
// starts the group commit.
func (l *Log) Start(ctx context.Context) error {
	if err := l.load(ctx); err != nil {
		return err
	}
	if p, ok := l.rows.(Pruner); ok {
		pb, err := p.PrunedBelow(ctx)
		if err != nil {
			return fmt.Errorf("audit: read where the log was pruned: %w", err)
		}
		l.prunedBelow.Store(pb)
	}
	if l.walPath != "" {
		if err := l.recoverWAL(ctx); err != nil {
			return err
		}
	}
	l.started = true
	go l.committer()
	go l.flusher()
	return nil
}

// load reads the position from the rows: their end and the hashes of the
// last complete subtree at every level (stored with record
// ((end>>l)<<l)-1, at position l).
func (l *Log) load(ctx context.Context) error {
	if hr, ok := l.rows.(HeadReader); ok {
		b, err := hr.ReadHead(ctx)
		if err != nil {
			return fmt.Errorf("audit: read the log's head: %w", err)
		}
		if b != nil {
			p, err := decodeHead(b)
			if err != nil {
				return err
			}
			l.next, l.front, l.stale = p.next, p.front, false
			return nil
		}
	}
	end, err := l.rows.RowsEnd(ctx)
	if err != nil {
		return fmt.Errorf("audit: read the log's end: %w", err)
	}
	front := make([]tlog.Hash, 0, 64)
	rows := map[uint64][]byte{}
	for level := 0; end>>level > 0; level++ {
		rec := (end>>level)<<level - 1
		row, ok := rows[rec]
		if !ok {
			rs, err := l.rows.ReadRows(ctx, rec, rec+1)
			if err != nil {
				return fmt.Errorf("audit: read record %d: %w", rec, err)
			}
			if len(rs) != 1 {
				return fmt.Errorf("audit: record %d missing", rec)
			}
			row, rows[rec] = rs[0], rs[0]
		}
		hs, _, err := splitRow(row)
		if err != nil || len(hs) < (level+1)*tlog.HashSize {
			return fmt.Errorf("audit: tree hash at level %d (record %d) missing", level, rec)
		}
		var h tlog.Hash
		copy(h[:], hs[level*tlog.HashSize:])
		front = append(front, h)
	}
	l.next, l.front, l.stale = end, front, false
	return nil
}

// splitRow splits a row into its tree hashes and the record.
func splitRow(v []byte) (hashes, record []byte, err error) {
	if len(v) < 1 || len(v) < 1+int(v[0])*tlog.HashSize {
		return nil, nil, errors.New("audit: malformed stored record")
	}
	n := 1 + int(v[0])*tlog.HashSize
	return v[1:n], v[n:], nil
}

// position is where the log ends: what encoding the next record needs.
type position struct {
	next  uint64
	front []tlog.Hash
}

// encode gives recs the next indexes and the chain of previous leaf hashes
// and returns their rows and canonical bytes, and the position after them.
// p is not changed.
func (p position) encode(recs []*kms.AuditRecord) (rows, datas [][]byte, after position) {
	front := append(make([]tlog.Hash, 0, 64), p.front...)
	next := p.next
	rows, datas = make([][]byte, len(recs)), make([][]byte, len(recs))
	for i, r := range recs {
		r.Index, r.PrevHash = next, ""
		if next > 0 {
			r.PrevHash = hex.EncodeToString(front[0][:])
		}
		data := r.Encode()
		rows[i], front = row(next, data, front)
		datas[i] = data
		next++
	}
	return rows, datas, position{next, front}
}

// row builds the row of record n and updates front: the record's leaf
// hash, then one hash per subtree it completes (tlog.StoredHashes, from
// the last complete subtree of each level instead of reads).
func row(n uint64, data []byte, front []tlog.Hash) ([]byte, []tlog.Hash) {
	h := tlog.RecordHash(data)
	m := bits.TrailingZeros64(n + 1)
	v := make([]byte, 0, 1+(m+1)*tlog.HashSize+len(data))
	v = append(v, byte(m+1))
	v = append(v, h[:]...)
	hashes := []tlog.Hash{h}
	for level := 0; level < m; level++ {
		h = tlog.NodeHash(front[level], h)
		v = append(v, h[:]...)
		hashes = append(hashes, h)
	}
	for level, h := range hashes {
		if level < len(front) {
			front[level] = h
		} else {
			front = append(front, h)
		}
	}
	return append(v, data...), front
}

// decodeRows checks that datas continue the log at p and returns their rows
// and the position after them.
func (p position) decode(datas [][]byte) ([][]byte, position, error) {
	front := append(make([]tlog.Hash, 0, 64), p.front...)
	next := p.next
	rows := make([][]byte, len(datas))
	for i, data := range datas {
		r, err := kms.DecodeAuditRecord(data)
		want := ""
		if next > 0 {
			want = hex.EncodeToString(front[0][:])
		}
		if err != nil || r.Index != next || r.PrevHash != want {
			return nil, p, fmt.Errorf("record %d does not continue the log", next)
		}
		rows[i], front = row(next, data, front)
		next++
	}
	return rows, position{next, front}, nil
}

func (l *Log) position() position { return position{l.next, l.front} }

func markCommitted(recs []*kms.AuditRecord) {
	for _, r := range recs {
		r.Committed = true
	}
}

// Batch is the rows a store transaction writes: the rows waiting in the
// journal, then the records the transaction carries.
type Batch struct {
	First uint64
	Rows  [][]byte

	l     *Log
	recs  []*kms.AuditRecord
	after position
	flush int  // pending rows included (a flush batch)
	held  bool // l.mu is held until Done
	done  bool
}

// Stage is called by a store inside a transaction that carries recs (or,
// with recs empty, from WriteAudit to move the journal's rows): it returns
// the rows to write. Until Done, the log takes no other staged batch.
func (l *Log) Stage(ctx context.Context, recs []*kms.AuditRecord) (*Batch, error) {
	if len(recs) == 0 {
		// A flush: the waiting rows do not change once written to the
		// journal, so the journal keeps taking groups meanwhile.
		l.mu.Lock()
		defer l.mu.Unlock()
		return &Batch{First: l.next - uint64(len(l.pending)), Rows: l.pending, l: l, flush: len(l.pending)}, nil
	}
	l.mu.Lock()
	if l.stale {
		if err := l.load(ctx); err != nil {
			l.mu.Unlock()
			return nil, err
		}
	}
	rows, _, after := l.position().encode(recs)
	if len(l.pending) > 0 {
		rows = append(append(make([][]byte, 0, len(l.pending)+len(rows)), l.pending...), rows...)
	}
	return &Batch{First: l.next - uint64(len(l.pending)), Rows: rows, l: l, recs: recs, after: after, flush: len(l.pending), held: true}, nil
}

// encodeHead is the position as bytes: next (u64, big endian), then the
// hash of the last complete subtree of each level.
func (p position) encodeHead() []byte {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, 8+len(p.front)*tlog.HashSize), p.next)
	for _, h := range p.front {
		b = append(b, h[:]...)
	}
	return b
}

func decodeHead(b []byte) (position, error) {
	if len(b) < 8 || (len(b)-8)%tlog.HashSize != 0 {
		return position{}, errors.New("audit: malformed log head")
	}
	p := position{next: binary.BigEndian.Uint64(b)}
	if want := bits.Len64(p.next); (len(b)-8)/tlog.HashSize != want {
		return position{}, fmt.Errorf("audit: log head of %d records holds %d levels, want %d", p.next, (len(b)-8)/tlog.HashSize, want)
	}
	for i := 8; i < len(b); i += tlog.HashSize {
		var h tlog.Hash
		copy(h[:], b[i:])
		p.front = append(p.front, h)
	}
	return p, nil
}

// Done tells the log whether the transaction that wrote the batch
// committed (err nil). Records of a committed batch are marked Committed.
func (b *Batch) Done(err error) {
	if b == nil || b.done {
		return
	}
	b.done = true
	l := b.l
	if !b.held {
		l.mu.Lock()
	}
	defer l.mu.Unlock()
	switch {
	case err == nil:
		if b.held {
			l.next, l.front = b.after.next, b.after.front
		}
		l.pending = l.pending[b.flush:]
		if l.wal != nil {
			l.wal.flushed(b.First + uint64(b.flush))
		}
		markCommitted(b.recs)
	}
}

// Seal appends recs, records a replicated store made durable as pending
// (in their commit order), at the log's end: it gives them the next
// indexes and calls write with the index of the first, their rows and the
// log's head after them. write commits all that in one transaction that
// refuses with ErrConflict unless the rows end at first (another replica
// sealed first), and then returns the head it found instead, if it has it,
// so that the next Seal starts there. Seals of one Log run one at a time.
func (l *Log) Seal(ctx context.Context, recs []*kms.AuditRecord, write func(first uint64, rows [][]byte, head []byte) (found []byte, err error)) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stale {
		if err := l.load(ctx); err != nil {
			return err
		}
	}
	rows, _, after := l.position().encode(recs)
	found, err := write(l.next, rows, after.encodeHead())
	switch {
	case err == nil:
		l.next, l.front = after.next, after.front
	case errors.Is(err, ErrConflict):
		l.conflicts.Add(1)
		if p, derr := decodeHead(found); found != nil && derr == nil {
			l.next, l.front, l.stale = p.next, p.front, false
		} else {
			l.stale = true
		}
	default:
		// The transaction may have committed though the answer was lost.
		l.stale = true
	}
	return err
}

type appendReq struct {
	rec  *kms.AuditRecord
	done chan error
}

// errClosed is returned by AppendAudit after Close.
var errClosed = errors.New("the audit log is closed")

const maxGroup = 4096

// gatherWait bounds how long a group waits for requests that are still
// being served (Expect) to bring their records.
const gatherWait = 200 * time.Microsecond

// committer is the group commit loop: it takes every record waiting, and,
// while requests announced by Expect are still being served, waits (at
// most gatherWait) for their records to join; then it commits the group
// (one journal frame with one fdatasync, or one store transaction) and
// answers each caller. While one group commits the next gathers, so under
// load many requests share one commit, and an idle log costs one commit
// per record with no added delay.
func (l *Log) committer() {
	defer close(l.stopped)
	batch := make([]appendReq, 0, maxGroup)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	drain := func() {
		for len(batch) < l.maxGroup {
			select {
			case req := <-l.appendCh:
				batch = append(batch, req)
			default:
				return
			}
		}
	}
	for {
		batch = batch[:0]
		select {
		case <-l.quit:
			// Answer whatever was queued before the log closed.
			for {
				select {
				case req := <-l.appendCh:
					req.done <- errClosed
				default:
					return
				}
			}
		case req := <-l.appendCh:
			batch = append(batch, req)
		}
		drain()
		if l.expected.Load() > 0 {
			timer.Reset(gatherWait)
		wait:
			for l.expected.Load() > 0 && len(batch) < l.maxGroup {
				select {
				case req := <-l.appendCh:
					batch = append(batch, req)
					drain()
				case <-timer.C:
					break wait
				}
			}
			timer.Stop()
		}
		recs := make([]*kms.AuditRecord, len(batch))
		for i, req := range batch {
			recs[i] = req.rec
		}
		err := l.commitGroup(recs)
		if err == nil {
			l.groups.Add(1)
			markCommitted(recs)
		}
		for _, req := range batch {
			req.done <- err
		}
	}
}

// direct commits recs in a store transaction of their own (which also
// carries every row waiting in the journal).
func (l *Log) direct(recs []*kms.AuditRecord) error {
	return l.rows.WriteAudit(context.Background(), recs)
}

// commitGroup makes recs durable: as one journal frame, or without a
// journal as one store transaction. Groups go through a store transaction
// when the frame is larger than the whole journal, and for the rest of the
// process's life once a journal write has failed.
func (l *Log) commitGroup(recs []*kms.AuditRecord) error {
	if l.walPath == "" {
		return l.direct(recs)
	}
	for attempt := 0; ; attempt++ {
		l.mu.Lock()
		if l.walGone {
			l.mu.Unlock()
			if err := l.recreateWAL(); err != nil {
				return err
			}
			continue
		}
		if l.walBroken {
			l.mu.Unlock()
			return l.direct(recs)
		}
		rows, datas, after := l.position().encode(recs)
		frame := l.wal.encode(l.next, datas)
		off, ok := l.wal.place(int64(len(frame)))
		if !ok {
			l.mu.Unlock()
			if attempt > 0 || int64(len(frame)) > l.wal.size {
				return l.direct(recs) // only a frame larger than the journal fails twice
			}
			// The ring is full of records the store has not taken yet:
			// move them now, then retry once.
			if err := l.flush(); err != nil {
				return fmt.Errorf("audit: the journal is full and cannot be flushed: %w", err)
			}
			continue
		}
		if err := l.wal.write(frame, off, after.next); err != nil {
			// What reached the disk is unknown. Invalidate the frame if
			// the disk still lets us (best effort), and send every later
			// group through the store, whose commits supersede the frame
			// anyway: journal records below the store's end are ignored
			// at open.
			l.walBroken = true
			l.wal.invalidate(off)
			l.mu.Unlock()
			return fmt.Errorf("audit WAL: %w", err)
		}
		l.walSyncs.Add(1)
		if l.wal.replaced() {
			// The frame went to a file no restart will read: refuse its
			// records (their indexes are reused), and re-create the
			// journal before taking more.
			l.walGone = true
			l.mu.Unlock()
			if err := l.recreateWAL(); err != nil {
				return err
			}
			return errWALGone
		}
		l.next, l.front = after.next, after.front
		l.pending = append(l.pending, rows...)
		flush := len(l.pending) >= walFlushRecords || l.wal.used > l.wal.size/2
		l.mu.Unlock()
		if flush {
			select {
			case l.flushCh <- struct{}{}:
			default:
			}
		}
		return nil
	}
}

// waiting reports how many rows wait in the journal.
func (l *Log) waiting() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.pending)
}

// flush moves the rows waiting in the journal into the store in one
// transaction. The journal keeps taking groups meanwhile: only the rows
// waiting when it starts move.
func (l *Log) flush() error {
	if l.waiting() == 0 {
		return nil // nothing to move: no write transaction for an audit read
	}
	return l.rows.WriteAudit(context.Background(), nil)
}

// settle makes every acknowledged record a row before a read: it moves the
// journal's rows into the store, or has a Settler store seal its pending
// records.
func (l *Log) settle(ctx context.Context) error {
	if st, ok := l.rows.(Settler); ok {
		return st.Settle(ctx)
	}
	return l.flush()
}

// flusher moves journal rows into the store when many wait, and every
// flushInterval when any do.
func (l *Log) flusher() {
	defer close(l.flusherStopped)
	if l.walPath == "" {
		return
	}
	t := time.NewTicker(flushInterval)
	defer t.Stop()
	for {
		select {
		case <-l.quit:
			return
		case <-l.flushCh:
		case <-t.C:
		}
		l.mu.Lock()
		if !l.walBroken && l.wal.replaced() {
			l.walGone = true
		}
		gone := l.walGone
		l.mu.Unlock()
		if gone {
			if err := l.recreateWAL(); err != nil {
				l.flushErrors.Add(1) // groups stay refused; retried at the next tick
			}
			continue
		}
		if err := l.flush(); err != nil {
			l.flushErrors.Add(1) // retried at the next tick; the records stay durable in the journal
		}
	}
}

var flushInterval = 200 * time.Millisecond // a variable for tests

// recoverWAL opens the journal, copies into the store the records it holds
// past the store's end (groups acknowledged before a crash), checking that
// they continue the log, then zeroes the journal.
func (l *Log) recoverWAL(ctx context.Context) error {
	if _, err := os.Stat(l.walPath); errors.Is(err, os.ErrNotExist) && l.next > 0 {
		l.walMissing = true
	}
	w, err := openWAL(l.walPath, l.walSize)
	if err != nil {
		return fmt.Errorf("open audit WAL: %w", err)
	}
	datas, err := w.scan(l.next)
	if err != nil {
		w.close()
		return fmt.Errorf("read audit WAL %s: %w", l.walPath, err)
	}
	rows, after, err := l.position().decode(datas)
	if err != nil {
		w.close()
		return fmt.Errorf("audit WAL %s: %v (a WAL of another database?); refusing to start", l.walPath, err)
	}
	l.wal = w
	l.walRecovered = len(rows)
	if len(rows) > 0 {
		l.pending = rows
		l.next, l.front = after.next, after.front
		if err := l.rows.WriteAudit(ctx, nil); err != nil {
			w.close()
			l.wal = nil
			return fmt.Errorf("copy %d audit records from the WAL: %w", len(rows), err)
		}
	}
	if err := w.reset(); err != nil {
		w.close()
		l.wal = nil
		return fmt.Errorf("reset audit WAL: %w", err)
	}
	return nil
}

// errWALGone refuses audit groups while the journal is being re-created.
var errWALGone = errors.New("audit WAL: the file was deleted or replaced while in use; refusing records until it is re-created")

// recreateWAL, after the journal file was found deleted or replaced: moves
// every row waiting in the (orphaned) journal into the store, where it is
// durable, then makes a new journal file and uses it. Until it succeeds,
// groups are refused.
func (l *Log) recreateWAL() error {
	l.recreateMu.Lock()
	defer l.recreateMu.Unlock()
	l.mu.Lock()
	gone := l.walGone
	l.mu.Unlock()
	if !gone {
		return nil
	}
	// Groups are refused while walGone, so nothing joins pending
	// meanwhile; state changes commit through the store, which also takes
	// pending.
	if err := l.flush(); err != nil {
		return fmt.Errorf("%w: moving waiting records into the store: %v", errWALGone, err)
	}
	w, err := openWAL(l.walPath, l.walSize)
	if err != nil {
		return fmt.Errorf("%w: %v", errWALGone, err)
	}
	if err := w.reset(); err != nil {
		w.close()
		return fmt.Errorf("%w: %v", errWALGone, err)
	}
	l.mu.Lock()
	old := l.wal
	l.wal, l.walGone = w, false
	l.mu.Unlock()
	old.close()
	l.recreated.Add(1)
	return nil
}

// Expect implements kms.AuditStore: it announces a record on its way (a
// request being served); release says it has been handed to AppendAudit
// or will not come. The group commit waits briefly for announced records to
// join it.
func (l *Log) Expect() (release func()) {
	l.expected.Add(1)
	var once atomic.Bool
	return func() {
		if once.CompareAndSwap(false, true) {
			l.expected.Add(-1)
		}
	}
}

// AppendAudit implements kms.AuditStore.
func (l *Log) AppendAudit(ctx context.Context, rec *kms.AuditRecord) error {
	if !l.started {
		return errClosed
	}
	req := appendReq{rec: rec, done: make(chan error, 1)}
	select {
	case l.appendCh <- req:
	case <-l.quit:
		return errClosed
	case <-ctx.Done():
		return ctx.Err()
	}
	// Once queued the record is committed or refused; wait for the answer
	// even if ctx ends, so the caller never reports a record it cannot
	// vouch for. A record queued as the log closed, after the committer's
	// last look at the queue, is refused.
	select {
	case err := <-req.done:
		return err
	case <-l.stopped:
		select {
		case err := <-req.done:
			return err
		default:
			return errClosed
		}
	}
}

// AuditSize implements kms.AuditStore. Like every audit read, it first
// moves the rows waiting in the journal into the store.
func (l *Log) AuditSize(ctx context.Context) (uint64, error) {
	if err := l.settle(ctx); err != nil {
		return 0, err
	}
	return l.rows.RowsEnd(ctx)
}

// CanPrune reports whether the log's store can prune rows.
func (l *Log) CanPrune() bool {
	_, ok := l.rows.(Pruner)
	return ok
}

// SetCold gives the log the archive its pruned rows are read from.
func (l *Log) SetCold(c Cold) { l.cold = c }

// PrunedBelow is the index under which the store's rows may be absent,
// their records and hashes read from the archive (0: none pruned).
func (l *Log) PrunedBelow() uint64 { return l.prunedBelow.Load() }

// ErrNoCold: records were pruned to an archive this log was not given.
var ErrNoCold = errors.New("audit: records below this index were pruned to the audit archive, which this kmsd was not given (--audit-archive)")

// Prune deletes the rows of records below `below` but the ones Keep
// holds, in transactions of the store's size, until none is left. The
// caller makes sure an archive holds those records durably first. Reads
// of what was pruned go to the archive (SetCold) from the first
// transaction on.
func (l *Log) Prune(ctx context.Context, below uint64) (int, error) {
	p, ok := l.rows.(Pruner)
	if !ok {
		return 0, errors.New("audit: this store cannot prune its log")
	}
	if l.cold == nil {
		return 0, ErrNoCold
	}
	l.pruneMu.Lock()
	defer l.pruneMu.Unlock()
	size, err := l.AuditSize(ctx)
	if err != nil {
		return 0, err
	}
	if below > size {
		return 0, fmt.Errorf("audit: cannot prune below %d, past the log's end %d", below, size)
	}
	if below < l.prunedBelow.Load() {
		below = l.prunedBelow.Load()
	}
	total := 0
	for {
		n, err := p.PruneRows(ctx, below)
		if err != nil {
			return total, err
		}
		l.prunedBelow.Store(below)
		total += n
		if n == 0 {
			return total, nil
		}
	}
}

// refreshPruned reads where the store's rows were pruned (another
// replica may have pruned them); it reports whether that moved.
func (l *Log) refreshPruned(ctx context.Context) (bool, error) {
	p, ok := l.rows.(Pruner)
	if !ok || l.cold == nil {
		// Without an archive a pruned row cannot be read anyway: no
		// store read per audit read for kmsd without one (the default).
		return false, nil
	}
	pb, err := p.PrunedBelow(ctx)
	if err != nil {
		return false, err
	}
	for {
		cur := l.prunedBelow.Load()
		if pb <= cur {
			return false, nil
		}
		if l.prunedBelow.CompareAndSwap(cur, pb) {
			return true, nil
		}
	}
}

// AuditRecords implements kms.AuditStore: records below PrunedBelow come
// from the archive. A read that another replica's pruning overtook is
// made again, from the archive.
func (l *Log) AuditRecords(ctx context.Context, start, end uint64) ([][]byte, error) {
	for try := 0; ; try++ {
		if _, err := l.refreshPruned(ctx); err != nil {
			return nil, err
		}
		pb := l.prunedBelow.Load()
		recs, err := l.auditRecords(ctx, start, end)
		if err == nil || try == 3 {
			return recs, err
		}
		// A pruning (this process's or another replica's) overtook the
		// read: read again, from the archive as far as it pruned.
		if _, rerr := l.refreshPruned(ctx); rerr != nil || l.prunedBelow.Load() == pb {
			return nil, err
		}
	}
}

func (l *Log) auditRecords(ctx context.Context, start, end uint64) ([][]byte, error) {
	size, err := l.AuditSize(ctx)
	if err != nil {
		return nil, err
	}
	if start > end || end > size {
		return nil, &kms.Error{Kind: kms.KindInvalid, Msg: fmt.Sprintf("records [%d, %d) are outside the log of %d records", start, end, size)}
	}
	var out [][]byte
	if pb := l.prunedBelow.Load(); start < pb {
		if l.cold == nil {
			return nil, ErrNoCold
		}
		cut := min(end, pb)
		recs, err := l.cold.ColdRecords(ctx, start, cut)
		if err != nil {
			return nil, fmt.Errorf("audit: records [%d, %d) from the archive: %w", start, cut, err)
		}
		if uint64(len(recs)) != cut-start {
			return nil, fmt.Errorf("audit: %d of records [%d, %d) in the archive", len(recs), start, cut)
		}
		if cut == end {
			return recs, nil
		}
		out, start = recs, cut
	}
	rest, err := l.hotRecords(ctx, start, end)
	if err != nil {
		return nil, err
	}
	return append(out, rest...), nil
}

// hotRecords reads records [start, end) from the store's rows.
func (l *Log) hotRecords(ctx context.Context, start, end uint64) ([][]byte, error) {
	rows, err := l.rows.ReadRows(ctx, start, end)
	if err != nil {
		return nil, err
	}
	if uint64(len(rows)) != end-start {
		return nil, fmt.Errorf("audit: %d of records [%d, %d) read", len(rows), start, end)
	}
	out := make([][]byte, len(rows))
	for i, v := range rows {
		_, rec, err := splitRow(v)
		if err != nil {
			return nil, fmt.Errorf("record %d: %w", start+uint64(i), err)
		}
		out[i] = rec
	}
	return out, nil
}

// AuditHashes implements kms.AuditStore: the hash at (level, m) was stored
// with record ((m+1) << level) - 1, at position level. It does not settle
// first: the hashes asked for are of a tree no larger than a size
// AuditSize returned, which settled, and so are already in rows (a
// checkpoint, a proof and CheckLog all size first).
func (l *Log) AuditHashes(ctx context.Context, indexes []int64) ([][32]byte, error) {
	for try := 0; ; try++ {
		if _, err := l.refreshPruned(ctx); err != nil {
			return nil, err
		}
		pb := l.prunedBelow.Load()
		hs, err := l.auditHashes(ctx, indexes, false)
		if err == nil || try == 3 {
			return hs, err
		}
		if _, rerr := l.refreshPruned(ctx); rerr != nil || l.prunedBelow.Load() == pb {
			return nil, err
		}
	}
}

// TrustedRoot is the root of the tree of size n from the store's own
// rows, never the archive's (n at least PrunedBelow, whose Keep rows hold
// what that takes): what an archive's checkpoint is checked against.
func (l *Log) TrustedRoot(ctx context.Context, n uint64) (tlog.Hash, error) {
	if _, err := l.refreshPruned(ctx); err != nil {
		return tlog.Hash{}, err
	}
	if pb := l.prunedBelow.Load(); n < pb {
		return tlog.Hash{}, fmt.Errorf("audit: the store was pruned below %d: it cannot vouch for the tree of %d records", pb, n)
	}
	size, err := l.AuditSize(ctx)
	if err != nil {
		return tlog.Hash{}, err
	}
	if n > size {
		return tlog.Hash{}, fmt.Errorf("audit: the log has %d records, not %d", size, n)
	}
	return tlog.TreeHash(int64(n), tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		hs, err := l.auditHashes(ctx, idx, true)
		if err != nil {
			return nil, err
		}
		out := make([]tlog.Hash, len(hs))
		for i, h := range hs {
			out[i] = h
		}
		return out, nil
	}))
}

// auditHashes reads hashes from the rows, and the pruned ones from the
// archive (hotOnly: refused).
func (l *Log) auditHashes(ctx context.Context, indexes []int64, hotOnly bool) ([][32]byte, error) {
	out := make([][32]byte, len(indexes))
	read := map[uint64][]byte{}
	pb := l.prunedBelow.Load()
	keep := Keep(pb)
	var coldIdx []int64
	var coldAt []int
	for i, idx := range indexes {
		level, m := tlog.SplitStoredHashIndex(idx)
		rec := uint64((m+1)<<level) - 1
		if rec < pb && !keep(rec) {
			if hotOnly {
				return nil, fmt.Errorf("audit: tree hash %d (record %d) was pruned to the archive", idx, rec)
			}
			coldIdx, coldAt = append(coldIdx, idx), append(coldAt, i)
			continue
		}
		v, ok := read[rec]
		if !ok {
			rows, err := l.rows.ReadRows(ctx, rec, rec+1)
			if err != nil {
				return nil, fmt.Errorf("audit: tree hash %d (record %d): %w", idx, rec, err)
			}
			if len(rows) != 1 {
				return nil, fmt.Errorf("audit: tree hash %d (record %d) missing", idx, rec)
			}
			v, read[rec] = rows[0], rows[0]
		}
		hs, _, err := splitRow(v)
		if err != nil || len(hs) < (level+1)*tlog.HashSize {
			return nil, fmt.Errorf("audit: tree hash %d (record %d) missing", idx, rec)
		}
		copy(out[i][:], hs[level*tlog.HashSize:])
	}
	if len(coldIdx) > 0 {
		if l.cold == nil {
			return nil, ErrNoCold
		}
		hs, err := l.cold.ColdHashes(ctx, coldIdx)
		if err != nil {
			return nil, fmt.Errorf("audit: tree hashes from the archive: %w", err)
		}
		if len(hs) != len(coldIdx) {
			return nil, fmt.Errorf("audit: %d of %d tree hashes in the archive", len(hs), len(coldIdx))
		}
		for j, i := range coldAt {
			out[i] = hs[j]
		}
	}
	return out, nil
}

// PutCheckpoint implements kms.AuditStore.
func (l *Log) PutCheckpoint(ctx context.Context, size uint64, note []byte) error {
	return l.rows.PutCheckpoint(ctx, size, note)
}

// LatestCheckpoint implements kms.AuditStore.
func (l *Log) LatestCheckpoint(ctx context.Context) (uint64, []byte, error) {
	return l.rows.LatestCheckpoint(ctx)
}

// Close stops the group commit and the flusher and moves the rows waiting
// in the journal into the store (if that fails they stay in the journal
// and are copied at the next start). The store closes after the Log.
func (l *Log) Close() error {
	var err error
	l.closeOnce.Do(func() {
		close(l.quit)
		if !l.started {
			return
		}
		<-l.stopped
		<-l.flusherStopped
		err = l.flush()
		if l.wal != nil {
			if cerr := l.wal.close(); err == nil {
				err = cerr
			}
		}
	})
	return err
}

// Groups counts the group commits.
func (l *Log) Groups() uint64 { return l.groups.Load() }

// JournalSyncs counts the journal frames written (one fdatasync each).
func (l *Log) JournalSyncs() uint64 { return l.walSyncs.Load() }

// FlushErrors counts background moves of journal rows into the store that
// failed (retried at the next tick; the records stay durable in the
// journal).
func (l *Log) FlushErrors() uint64 { return l.flushErrors.Load() }

// Conflicts counts batches refused because another writer appended first.
func (l *Log) Conflicts() uint64 { return l.conflicts.Load() }

// JournalRecovered is how many records Start copied from the journal into
// the store: records acknowledged before a crash the store did not have.
func (l *Log) JournalRecovered() int { return l.walRecovered }

// JournalMissing reports whether Start found no journal file beside a log
// that has records: the file was deleted while no kmsd ran, or before a
// crash; records acknowledged only in it are lost.
func (l *Log) JournalMissing() bool { return l.walMissing }

// JournalUse is the bytes the journal's frames not yet in the store use,
// and the journal's size (both 0 without a journal). Past half its size
// the journal is flushed into the store; when it is full, requests wait
// for the flush.
func (l *Log) JournalUse() (used, size int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.wal == nil {
		return 0, 0
	}
	return l.wal.used, l.wal.size
}

// JournalRecreated counts the journal files made anew after the one in use
// was deleted or replaced.
func (l *Log) JournalRecreated() uint64 { return l.recreated.Load() }

// Continue appends records written before, elsewhere (read back from an
// archive after a restore), as the log's next ones: each must carry the
// next index and its predecessor's leaf hash, so that the log becomes the
// one they were written in. For a log nothing else appends to meanwhile
// (kmsd restore); records are written in groups of the store's size.
func (l *Log) Continue(ctx context.Context, datas [][]byte) error {
	for len(datas) > 0 {
		n := min(len(datas), l.maxGroup)
		chunk := datas[:n]
		datas = datas[n:]
		if err := l.settle(ctx); err != nil {
			return err
		}
		l.mu.Lock()
		_, _, err := l.position().decode(chunk)
		l.mu.Unlock()
		if err != nil {
			return fmt.Errorf("audit: %w", err)
		}
		recs := make([]*kms.AuditRecord, n)
		for i, d := range chunk {
			if recs[i], err = kms.DecodeAuditRecord(d); err != nil {
				return err
			}
		}
		if err := l.rows.WriteAudit(ctx, recs); err != nil {
			return err
		}
		if s, ok := l.rows.(Settler); ok {
			if err := s.Settle(ctx); err != nil {
				return err
			}
		}
		for i, r := range recs {
			if !bytes.Equal(r.Encode(), chunk[i]) {
				return fmt.Errorf("audit: record %d was written in another form than it was read", r.Index)
			}
		}
	}
	return nil
}

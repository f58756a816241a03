package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/internal/testetcd"
)

// robustFlags: revoked tokens are tried again and again, each refusal
// audited on its own (not summarized past a rate limit).
var robustFlags = []string{"--unauth-rate-limit", "0"}

// robustKeys are the keys the clients rotate and read.
var robustKeys = []string{"r0", "r1", "r2"}

// keyOp is one rotation or read of a key, as a client saw it.
type keyOp struct {
	rotate bool
	out    uint64 // the version a rotation made, or the latest a read saw; 0: unknown outcome
}

// answer is one request's answer, for the audit check.
type answer struct {
	status  int
	unknown bool // 503 outcome-unknown: a record exactly if the change was made
	// unrecorded: a 503 that may have none (fail-closed: the audit log
	// could not make its record durable, so the request was refused).
	unrecorded bool
}

// robustRun is what the clients of TestReplicasUnderFaults recorded.
type robustRun struct {
	mu      sync.Mutex
	start   time.Time
	ops     map[string][]porcupine.Operation
	answers map[string]answer // by request id
	revoked map[string]time.Duration
	uses    []tokenUse
	torn    []string
	stats   map[string]int
}

type tokenUse struct {
	token    string
	started  time.Duration
	accepted bool
}

func (r *robustRun) now() int64 { return int64(time.Since(r.start)) }

func (r *robustRun) count(what string) {
	r.mu.Lock()
	r.stats[what]++
	r.mu.Unlock()
}

// robustDo sends one request and returns its status, request id,
// problem type and body; status 0 when no answer came, -1 when the
// request was never sent (the connection was refused).
func robustDo(hc *http.Client, method, url, token, body string) (int, string, string, []byte) {
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := hc.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return -1, "", "", nil // never sent (a killed replica): no effect
		}
		return 0, "", "", nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var p struct{ Type string }
	if resp.StatusCode >= 400 {
		_ = json.Unmarshal(b, &p)
	}
	return resp.StatusCode, resp.Header.Get("X-Request-Id"), p.Type, b
}

// versionModel is one key's latest version: a rotation makes the next,
// a read sees the current; a rotation of unknown outcome may have made
// the next at any point after it was sent (its return is at the end).
var versionModel = porcupine.Model{
	Init: func() any { return uint64(1) },
	Step: func(state, input, output any) (bool, any) {
		st, in, out := state.(uint64), input.(keyOp), output.(keyOp)
		if in.rotate {
			if out.out == 0 {
				return true, st + 1
			}
			return out.out == st+1, out.out
		}
		return out.out == st, st
	},
	Hash: func(state any) uint64 { return state.(uint64) },
	DescribeOperation: func(input, output any) string {
		if input.(keyOp).rotate {
			return fmt.Sprintf("rotate -> %d", output.(keyOp).out)
		}
		return fmt.Sprintf("get -> %d", output.(keyOp).out)
	},
}

// TestReplicasUnderFaults is issue 24's robustness test: three kmsd
// replicas on a three-member etcd cluster, clients rotating and reading
// keys and using tokens that get revoked, while replicas and etcd members
// are killed with SIGKILL and paused with SIGSTOP. Then:
//   - each key's history (rotations and reads, with their answers) is
//     linearizable (porcupine): a rotation answered failed never shows
//     up, one answered done is never lost, no read sees a version before
//     or after its time;
//   - no read lists a version newer than the header it came with;
//   - no revoked token is accepted by a request that started more than
//     the 1 s bound after the revocation was acknowledged;
//   - the audit log verifies and holds exactly one record per answered
//     request id, with the status answered (at most one for an
//     outcome-unknown answer, and for a 503, which may be the fail-closed
//     refusal of a request whose record could not be made durable).
//
// KMSD_ROBUST_SECONDS sets the faulted run's length (default 20 s;
// deploy/robust.sh runs longer ones).
func TestReplicasUnderFaults(t *testing.T) {
	secs := 20
	if v := os.Getenv("KMSD_ROBUST_SECONDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 5 {
			t.Fatalf("KMSD_ROBUST_SECONDS=%q: want a number of seconds, at least 5", v)
		}
		secs = n
	}
	c := testetcd.Start(t, 3)
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	ps := make([]*proc, 3)
	for i := range ps {
		tokenOf := dirs[0]
		if i == 0 {
			tokenOf = ""
		}
		ps[i] = startReplica(t, c, nil, dirs[i], tokenOf, robustFlags...)
		ps[i].waitReady(t)
	}
	adminTok, err := os.ReadFile(filepath.Join(dirs[0], "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	admin := strings.TrimSpace(string(adminTok))
	for _, k := range robustKeys {
		if st, _, _, b := robustDo(http.DefaultClient, "POST", ps[0].url()+"/v1/keys", admin, `{"name":"`+k+`","kind":"ml-dsa-65"}`); st != 201 {
			t.Fatalf("create %s: %d %s", k, st, b)
		}
	}
	run := &robustRun{start: time.Now(), ops: map[string][]porcupine.Operation{}, answers: map[string]answer{}, revoked: map[string]time.Duration{}, stats: map[string]int{}}
	var aliveMu sync.RWMutex
	url := func(i int) string {
		aliveMu.RLock()
		defer aliveMu.RUnlock()
		return ps[i].url()
	}
	hc := &http.Client{Timeout: 15 * time.Second}
	note := func(id string, st int, typ string) {
		if id == "" {
			return
		}
		run.mu.Lock()
		run.answers[id] = answer{status: st, unknown: strings.HasSuffix(typ, ":outcome-unknown"), unrecorded: st == http.StatusServiceUnavailable}
		run.mu.Unlock()
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup

	// Key clients.
	for cl := range 6 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(cl), 7))
			for {
				select {
				case <-stop:
					return
				default:
				}
				key := robustKeys[rng.IntN(len(robustKeys))]
				base := url(rng.IntN(3))
				call := run.now()
				if rng.IntN(3) == 0 {
					st, id, typ, b := robustDo(hc, "POST", base+"/v1/keys/"+key+"/rotate", admin, "")
					ret := run.now()
					note(id, st, typ)
					var v client.Version
					switch {
					case st == 201 && json.Unmarshal(b, &v) == nil && v.Version > 0:
						run.add(key, porcupine.Operation{ClientId: cl, Input: keyOp{rotate: true}, Call: call, Output: keyOp{rotate: true, out: v.Version}, Return: ret})
						run.count("rotate ok")
					case st == 0 || strings.HasSuffix(typ, ":outcome-unknown"):
						// It may have been made, at any time after it was sent.
						run.add(key, porcupine.Operation{ClientId: cl, Input: keyOp{rotate: true}, Call: call, Output: keyOp{rotate: true}, Return: math.MaxInt64})
						run.count("rotate unknown")
					default:
						// Answered not done: it must not show up.
						run.count(fmt.Sprintf("rotate %d", st))
					}
				} else {
					st, id, typ, b := robustDo(hc, "GET", base+"/v1/keys/"+key+"?limit=5", admin, "")
					ret := run.now()
					note(id, st, typ)
					var k client.Key
					if st == 200 && json.Unmarshal(b, &k) == nil {
						for _, v := range k.Versions {
							if v.Version > k.LatestVersion {
								run.mu.Lock()
								run.torn = append(run.torn, fmt.Sprintf("%s: latest_version %d with version %d", key, k.LatestVersion, v.Version))
								run.mu.Unlock()
							}
						}
						run.add(key, porcupine.Operation{ClientId: cl, Input: keyOp{}, Call: call, Output: keyOp{out: k.LatestVersion}, Return: ret})
						run.count("get ok")
					} else {
						run.count(fmt.Sprintf("get %d", st))
					}
				}
			}
		})
	}

	// Tokens made, used, revoked; every revoked one tried again and again.
	wg.Go(func() {
		rng := rand.New(rand.NewPCG(99, 1))
		var live []string
		for {
			select {
			case <-stop:
				return
			case <-time.After(300 * time.Millisecond):
			}
			base := url(rng.IntN(3))
			if len(live) < 3 {
				st, id, typ, b := robustDo(hc, "POST", base+"/v1/tokens", admin, `{"role":"worker","keys":["*"],"ttl":"1h"}`)
				note(id, st, typ)
				var tk client.Token
				if st == 201 && json.Unmarshal(b, &tk) == nil {
					live = append(live, tk.ID+" "+tk.Token)
				}
				continue
			}
			pick := live[0]
			live = live[1:]
			idTok := strings.Fields(pick)
			st, id, typ, _ := robustDo(hc, "DELETE", base+"/v1/tokens/"+idTok[0], admin, "")
			acked := time.Since(run.start)
			note(id, st, typ)
			if st == 200 {
				run.mu.Lock()
				run.revoked[idTok[1]] = acked
				run.mu.Unlock()
			}
		}
	})
	for cl := range 2 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(cl), 42))
			for {
				select {
				case <-stop:
					return
				default:
				}
				run.mu.Lock()
				var toks []string
				for tok := range run.revoked {
					toks = append(toks, tok)
				}
				run.mu.Unlock()
				if len(toks) == 0 {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				tok := toks[rng.IntN(len(toks))]
				started := time.Since(run.start)
				st, id, typ, _ := robustDo(hc, "GET", url(rng.IntN(3))+"/v1/keys/"+robustKeys[0]+"/versions/primary/public-key", tok, "")
				note(id, st, typ)
				if st != 0 {
					run.mu.Lock()
					run.uses = append(run.uses, tokenUse{token: tok, started: started, accepted: st == 200})
					run.mu.Unlock()
				}
			}
		})
	}

	// Faults.
	faults := []string{}
	rng := rand.New(rand.NewPCG(5, 5))
	deadline := time.Now().Add(time.Duration(secs) * time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(time.Duration(1500+rng.IntN(1500)) * time.Millisecond)
		i := rng.IntN(3)
		switch rng.IntN(4) {
		case 0: // a replica paused
			ps[i].cmd.Process.Signal(syscall.SIGSTOP)
			time.Sleep(time.Duration(1500+rng.IntN(2000)) * time.Millisecond)
			ps[i].cmd.Process.Signal(syscall.SIGCONT)
			faults = append(faults, fmt.Sprintf("SIGSTOP replica %d", i))
		case 1: // a replica killed and restarted
			ps[i].cmd.Process.Kill()
			ps[i].wait(t, 10*time.Second)
			time.Sleep(500 * time.Millisecond)
			tokenOf := dirs[0]
			if i == 0 {
				tokenOf = ""
			}
			aliveMu.Lock()
			ps[i] = startReplica(t, c, nil, dirs[i], tokenOf, robustFlags...)
			aliveMu.Unlock()
			ps[i].waitReady(t)
			faults = append(faults, fmt.Sprintf("SIGKILL replica %d", i))
		case 2: // an etcd member paused
			c.Signal(i, syscall.SIGSTOP)
			time.Sleep(time.Duration(1000+rng.IntN(2000)) * time.Millisecond)
			c.Signal(i, syscall.SIGCONT)
			faults = append(faults, fmt.Sprintf("SIGSTOP etcd %d", i))
		case 3: // an etcd member killed and restarted
			c.Kill(i)
			time.Sleep(time.Duration(500+rng.IntN(1500)) * time.Millisecond)
			c.Restart(i)
			c.WaitHealthy()
			faults = append(faults, fmt.Sprintf("SIGKILL etcd %d", i))
		}
	}
	close(stop)
	wg.Wait()
	c.WaitHealthy()
	t.Logf("%d s, faults: %s", secs, strings.Join(faults, ", "))
	t.Logf("answers: %v", run.stats)

	// Linearizable per key.
	for _, k := range robustKeys {
		ops := run.ops[k]
		res, info := porcupine.CheckOperationsVerbose(versionModel, ops, time.Minute)
		if res != porcupine.Ok {
			f := filepath.Join(t.TempDir(), k+".html")
			if out, err := os.Create(f); err == nil {
				porcupine.Visualize(versionModel, info, out)
				out.Close()
			}
			t.Errorf("key %s: %d operations are not linearizable (%v); visualization: %s", k, len(ops), res, f)
		}
	}
	for _, s := range run.torn {
		t.Errorf("a torn read: %s", s)
	}
	// Revocation within the bound.
	bound := time.Second
	late := 0
	for _, u := range run.uses {
		if u.accepted && u.started > run.revoked[u.token]+bound {
			late++
			if late <= 5 {
				t.Errorf("a token revoked at %v was accepted by a request started at %v", run.revoked[u.token], u.started)
			}
		}
	}
	t.Logf("%d uses of %d revoked tokens checked against the %v bound", len(run.uses), len(run.revoked), bound)

	// One record per answered request id, with the status answered.
	adminC := adminClient(t, ps[0], dirs[0])
	var recsN int
	seen := map[string]int{}
	status := map[string]int{}
	ok := false
	for wait := time.Now().Add(15 * time.Second); ; {
		_, recs := verifyLog(t, adminC)
		recsN = len(recs)
		clear(seen)
		for _, r := range recs {
			if r.RequestID != "" {
				seen[r.RequestID]++
				status[r.RequestID] = r.Status
			}
		}
		missing := 0
		for id, a := range run.answers {
			if !a.unknown && !a.unrecorded && seen[id] == 0 {
				missing++
			}
		}
		if missing == 0 {
			ok = true
			break
		}
		if time.Now().After(wait) {
			t.Errorf("%d answered requests have no record in the verified log", missing)
			break
		}
		time.Sleep(300 * time.Millisecond)
	}
	for id, n := range seen {
		if n > 1 {
			t.Errorf("request %s has %d records", id, n)
		}
	}
	bad := 0
	for id, a := range run.answers {
		if !a.unknown && seen[id] == 1 && status[id] != a.status {
			bad++
			if bad <= 5 {
				t.Errorf("request %s was answered %d and recorded %d", id, a.status, status[id])
			}
		}
	}
	t.Logf("%d answered requests, %d records, every answered request recorded once: %v", len(run.answers), recsN, ok && bad == 0)
}

func (r *robustRun) add(key string, op porcupine.Operation) {
	r.mu.Lock()
	r.ops[key] = append(r.ops[key], op)
	r.mu.Unlock()
}

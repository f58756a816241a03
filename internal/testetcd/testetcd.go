// Package testetcd starts real etcd servers (Debian's etcd-server, which
// the test command installs) on loopback for tests: one member, or a
// cluster whose members a test can kill and restart.
package testetcd

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Cluster is a running etcd cluster.
type Cluster struct {
	t       testing.TB
	dir     string
	members []*member
	scheme  string
	tls     *tls.Config // for the health check, when members serve TLS
}

// TLS makes Start serve clients over TLS with cert and key, and require
// client certificates chained to ca.
type TLS struct {
	Cert, Key, CA string
	// Client is the configuration the health check connects with.
	Client *tls.Config
}

type member struct {
	name, client, peer string
	cmd                *exec.Cmd
	done               chan struct{}
	log                *os.File
}

func freePort(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Binary is the etcd server's path, or a test failure that says how to get
// it.
func Binary(t testing.TB) string {
	p, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatalf("etcd not found on PATH (%v): ./deploy/test.sh installs it (Debian's etcd-server)", err)
	}
	return p
}

// Start starts an n-member cluster and waits until it answers; the test's
// cleanup stops it.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	return StartWith(t, n)
}

// StartWith is Start with more flags for every member (a small
// --quota-backend-bytes, say).
func StartWith(t testing.TB, n int, extra ...string) *Cluster {
	t.Helper()
	return start(t, n, nil, extra)
}

// StartTLS is Start with client connections over TLS (mutual).
func StartTLS(t testing.TB, n int, cfg TLS) *Cluster {
	t.Helper()
	return start(t, n, &cfg, nil)
}

func start(t testing.TB, n int, tc *TLS, extra []string) *Cluster {
	t.Helper()
	bin := Binary(t)
	c := &Cluster{t: t, dir: t.TempDir(), scheme: "http"}
	if tc != nil {
		c.scheme, c.tls = "https", tc.Client
		extra = append(extra, "--cert-file", tc.Cert, "--key-file", tc.Key, "--trusted-ca-file", tc.CA, "--client-cert-auth")
	}
	var initial []string
	for i := range n {
		m := &member{name: fmt.Sprintf("m%d", i), client: freePort(t), peer: freePort(t)}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"=http://"+m.peer)
	}
	for _, m := range c.members {
		m.cmd = exec.Command(bin,
			"--name", m.name,
			"--data-dir", filepath.Join(c.dir, m.name),
			"--listen-client-urls", c.scheme+"://"+m.client, "--advertise-client-urls", c.scheme+"://"+m.client,
			"--listen-peer-urls", "http://"+m.peer, "--initial-advertise-peer-urls", "http://"+m.peer,
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", filepath.Base(c.dir))
		m.cmd.Args = append(m.cmd.Args, extra...)
		c.start(m)
	}
	t.Cleanup(c.Stop)
	c.WaitHealthy()
	return c
}

func (c *Cluster) start(m *member) {
	var err error
	if m.log == nil {
		if m.log, err = os.Create(filepath.Join(c.dir, m.name+".log")); err != nil {
			c.t.Fatal(err)
		}
	}
	cmd := exec.Command(m.cmd.Path, m.cmd.Args[1:]...)
	cmd.Stdout, cmd.Stderr = m.log, m.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("start etcd: %v", err)
	}
	m.cmd, m.done = cmd, make(chan struct{})
	go func(done chan struct{}) { cmd.Wait(); close(done) }(m.done)
}

// Endpoints are the members' client addresses.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, m := range c.members {
		out = append(out, c.scheme+"://"+m.client)
	}
	return out
}

// WaitHealthy waits until every running member answers a linearizable
// read.
func (c *Cluster) WaitHealthy() {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for _, m := range c.members {
		select {
		case <-m.done:
			continue // killed
		default:
		}
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{c.scheme + "://" + m.client}, TLS: c.tls, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			c.t.Fatal(err)
		}
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, err := cli.Get(ctx, "health")
			cancel()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				cli.Close()
				log, _ := os.ReadFile(m.log.Name())
				c.t.Fatalf("etcd member %s did not become healthy: %v\n%s", m.name, err, tail(log))
			}
			time.Sleep(100 * time.Millisecond)
		}
		cli.Close()
	}
}

func tail(b []byte) []byte {
	if len(b) > 4000 {
		return b[len(b)-4000:]
	}
	return b
}

// Kill stops member i with SIGKILL.
func (c *Cluster) Kill(i int) {
	m := c.members[i]
	m.cmd.Process.Kill()
	<-m.done
}

// Signal sends sig to member i (SIGSTOP, SIGCONT: a pause).
func (c *Cluster) Signal(i int, sig os.Signal) {
	if p := c.members[i].cmd.Process; p != nil {
		p.Signal(sig)
	}
}

// Restart starts member i again on its data dir (after Kill).
func (c *Cluster) Restart(i int) {
	m := c.members[i]
	for j, a := range m.cmd.Args {
		if a == "--initial-cluster-state" {
			m.cmd.Args[j+1] = "existing"
		}
	}
	c.start(m)
}

// SetFlag sets a flag of every member for its next (re)start.
func (c *Cluster) SetFlag(name, value string) {
	for _, m := range c.members {
		if i := slices.Index(m.cmd.Args, name); i >= 0 && i+1 < len(m.cmd.Args) {
			m.cmd.Args[i+1] = value
		} else {
			m.cmd.Args = append(m.cmd.Args, name, value)
		}
	}
}

// Stop kills every member.
func (c *Cluster) Stop() {
	for _, m := range c.members {
		select {
		case <-m.done:
		default:
			m.cmd.Process.Kill()
			<-m.done
		}
		if m.log != nil {
			m.log.Close()
		}
	}
}

// RemoveAll deletes the cluster's data (for a cluster kept past its test).
func (c *Cluster) RemoveAll() { os.RemoveAll(c.dir) }

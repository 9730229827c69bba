// Package splice owns the copy between a local TCP connection and the
// connection it is carried on (a tunnelled flow, or another TCP
// connection): both directions until both end, a clean end of stream passed
// on as a half-close, and an error on one side passed on as a reset of the
// other, so that a cut connection never looks complete to either program.
package splice

import (
	"io"
	"net"
	"sync"
)

// Conn is the far side of a splice: a connection that can half-close and
// reset. When it is also an io.ReaderFrom or an io.WriterTo (a *flow.Conn
// is both, a *net.TCPConn too), Splice copies through those, without a
// buffer of its own in between.
type Conn interface {
	net.Conn
	// CloseWrite sends an end of stream after what was written.
	CloseWrite() error
	// Reset ends both directions abruptly: the far end sees a reset, not
	// an end of stream.
	Reset() error
}

// Splice copies between tcp and c until both directions end, then closes
// both. What tcp sends ends in c.CloseWrite when tcp ends cleanly; when
// reading tcp (or writing c) fails, c is reset and tcp's reading side
// closed. What c sends ends in tcp.CloseWrite when c ends cleanly; when
// reading c (or writing tcp) fails, tcp is reset (an RST: SO_LINGER 0, then
// close), which also ends the other copy, and c is reset.
func Splice(tcp *net.TCPConn, c Conn) {
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := readFrom(c, tcp); err != nil {
			c.Reset()
			tcp.CloseRead()
			return
		}
		c.CloseWrite()
	})
	if _, err := writeTo(tcp, c); err != nil {
		tcp.SetLinger(0)
		tcp.Close() // resets tcp's peer; unblocks the other copy
		c.Reset()
	} else {
		tcp.CloseWrite()
	}
	wg.Wait()
	tcp.Close()
	c.Close()
}

// readFrom copies r to c until r's end (nil) or an error, through c's
// ReadFrom when it has one.
func readFrom(c Conn, r io.Reader) (int64, error) {
	if rf, ok := c.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c}, r)
}

// writeTo copies c to w until c's end (nil) or an error, through c's
// WriteTo when it has one.
func writeTo(w io.Writer, c Conn) (int64, error) {
	if wt, ok := c.(io.WriterTo); ok {
		return wt.WriteTo(w)
	}
	return io.Copy(w, struct{ io.Reader }{c})
}
